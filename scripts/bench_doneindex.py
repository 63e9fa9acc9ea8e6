"""The done set's start-up with and without the done index, in-process, no model:

    PYTHONPATH=. python scripts/bench_doneindex.py N [WORK]

Synthesizes (as `make bench-scale` does, kept in WORK/nN, default /tmp/bench-doneindex) an
OUTPUT of N labeled images and a manifest of those N plus 1,000 new; then two "nights" without
labeling: doneindex.done_set (night 1 builds from the parts, night 2 maps the saved index),
every manifest chunk checked against it as a run checks it (the done set's lookup handed to
the listing, sources.KnownIds), doneindex.refresh. Prints the CPU seconds of each
step and the peak RSS.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    import bench_scale as b
    import pyarrow.parquet as pq

    from pipeline import doneindex, doneset, store
    from pipeline.sources import KnownIds, SourceStats, iter_chunks

    n = b.counts(sys.argv[1])[0]
    case = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/bench-doneindex") / f"n{n}"
    if not (case / "manifest.parquet").exists():
        case.mkdir(parents=True, exist_ok=True)
        new = b.write_new_images(case / "new")
        archived = b.write_new_images_single(case / "archived.jpg")
        b.write_archive(case / "out", n, 4096, archived, b.identity_metadata())
        b.write_manifest(case / "manifest.parquet", n, archived, new)
    meta = pq.read_schema(sorted((case / "out").glob("part-*.parquet"))[0]).metadata
    identity = doneset.Identity(*(meta[f"pipeline.{f}".encode()].decode() for f in
                                  ("model", "weights_sha256", "preprocessing", "runtime",
                                   "precision")))
    out = store.open_output(str(case / "out"))
    result: dict[str, float] = {}
    for night in (1, 2):
        t = cpu()
        done, basis = doneindex.done_set(out, identity)
        result[f"night{night}_done_set_cpu_s"] = cpu() - t
        t, skipped = cpu(), 0
        known = KnownIds()
        known.lookup = done.find
        for chunk in iter_chunks(str(case / "manifest.parquet"), SourceStats(), None, None,
                                 known=known):
            found = chunk.found if chunk.found is not None else done.find(chunk.ids)
            skipped += int(done.check_found(found, chunk.size, chunk.mtime_ns)[0].sum())
        result[f"night{night}_listing_check_cpu_s"] = cpu() - t
        t = cpu()
        doneindex.refresh(out, identity, basis)
        result[f"night{night}_refresh_cpu_s"] = cpu() - t
        assert skipped == n, (skipped, n)
    print(json.dumps({k: round(v, 3) for k, v in result.items()} |
                     {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10}))


if __name__ == "__main__":
    main()
