"""CPU cost of the JPEG hole check (imageinfo.jpeg_structure: an aligned block of zero bytes
inside a scan), next to the marker walk it rides on, and of the strict decode that a file whose
optimized Huffman tables code a flat area as zeros is sent to, next to TensorFlow's decode.

    python scripts/bench_jpeg_holes.py [--images DIR]

Process CPU time, best of several rounds (the machine is shared: compare within one run).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.imageinfo import jpeg_structure  # noqa: E402


def cpu_seconds(work, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return best


def white_page_photo(size=(4000, 3000)) -> bytes:
    """12 MP: a photo on a white page, optimized Huffman tables (zeros code the white)."""
    import skimage.data
    from PIL import Image

    page = Image.new("RGB", size, "white")
    page.paste(Image.fromarray(skimage.data.chelsea()).resize((1800, 1200)), (1100, 900))
    out = io.BytesIO()
    page.save(out, "JPEG", quality=90, optimize=True)
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "images" /
                                                "imagenet-sample-100"))
    args = parser.parse_args()
    files = sorted(p for p in Path(args.images).iterdir() if p.is_file())
    datas = [p.read_bytes() for p in files]
    parsed = [jpeg_structure._jpeg_structure(d)[1] for d in datas]
    mib = sum(map(len, datas)) / 2**20
    walk = cpu_seconds(lambda: [jpeg_structure._jpeg_structure(d) for d in datas])
    scan = cpu_seconds(lambda: [jpeg_structure._zero_block_in_scans(d, s)
                                for d, s in zip(datas, parsed)])
    print(f"load average {os.getloadavg()[0]:.1f}; {len(datas)} JPEGs, {mib:.1f} MiB")
    print(f"marker walk     {walk * 1e3:7.2f} ms  ({walk / len(datas) * 1e6:6.1f} us per file)")
    print(f"zero-block scan {scan * 1e3:7.2f} ms  ({scan / mib * 1e3:.2f} ms per MiB, "
          f"{scan / walk:.0%} of the walk)")
    import tensorflow as tf

    page = white_page_photo()
    decode = cpu_seconds(lambda: tf.io.decode_jpeg(page).numpy(), 3)
    strict = cpu_seconds(lambda: jpeg_structure.strict_jpeg_damage(page, strict=True), 3)
    print(f"12 MP white page ({len(page) / 2**20:.1f} MiB, optimized tables): TF decode "
          f"{decode * 1e3:.0f} ms, strict decode {strict * 1e3:.0f} ms ({strict / decode:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
