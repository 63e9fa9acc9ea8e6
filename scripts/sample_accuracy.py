"""Top-1/top-5 of a labeled OUTPUT on photos named by their true ImageNet class: the shared
sample's `n01440764_tench.JPEG`, the bench's copies of it `00_n01440764_tench.jpg` (variant 00 is
the photo itself, re-encoded or upscaled). One definition for the tests' accuracy checks and
the bench's accuracy rows."""
from __future__ import annotations

import re
from pathlib import Path

# The WordNet id in a file name: an 'n' and 8 digits, a whole '_'-separated part
WNID = re.compile(r"(?:^|_)(n\d{8})(?=_|\.|$)")


def true_wnid(image_id: str) -> str:
    """The class a file name carries (ValueError if none: every photo must have one)."""
    found = WNID.search(Path(image_id).name)
    if not found:
        raise ValueError(f"no ImageNet class id in the file name {image_id!r}")
    return found.group(1)


def accuracy(output: str | Path, prefix: str = "") -> dict:
    """{"images", "ok", "top1", "top5"} of OUTPUT's rows whose image_id starts with `prefix`
    (every row, and a row not labeled counts as wrong)."""
    import pandas as pd

    df = pd.read_parquet(output, columns=["image_id", "status", "label_id", "label_ids"])
    df = df[df.image_id.str.startswith(prefix)]
    truth = df.image_id.map(true_wnid)
    ok = df.status == "ok"
    top1 = ok & (df.label_id == truth)
    top5 = ok & pd.Series([t in list(ids if ids is not None else ()) for t, ids
                           in zip(truth, df.label_ids)], index=df.index)
    return {"images": len(df), "ok": int(ok.sum()), "top1": float(top1.mean()),
            "top5": float(top5.mean())}
