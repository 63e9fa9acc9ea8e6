"""`make bench` formats section (`--only formats`): the CPU decode path per file format.

The same photos as JPEG (q90), HEIC (pillow-heif, q90; 512x512 grid tiles at 12 MP, as iPhones
write them), AVIF (Pillow, q90) and TIFF (LZW), at ImageNet size (the bench's first source
JPEGs) and at 12 MP (the photo-size section's phone JPEGs), written once and cached under
bench-results/ by a hash of the recipe. Each format goes through the reader's tf.data pipeline
alone (read, inspect, decode, crop, resize, normalize; no model), the formats interleaved in
every round; per format the fastest round's images/s and the process CPU time per image (all
threads: TensorFlow's, libheif's and libavif's), and both as ratios to JPEG at the same size.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

FORMATS = ("jpeg", "heic", "avif", "tiff")
SUFFIXES = {"jpeg": ".jpg", "heic": ".heic", "avif": ".avif", "tiff": ".tif"}
N_SMALL, N_PHONE = 60, 8
QUALITY = 90


def section(small: list[str], phone: list[str], out: Path, spec, repeat: int, log, loadavg) -> dict:
    sets = {"imagenet": prepare(small[:N_SMALL], out, "imagenet", log),
            "12mp": prepare(phone[:N_PHONE], out, "12mp", log)}
    log(f"formats: {N_SMALL} ImageNet-size and {N_PHONE} 12 MP photos per format, "
        f"load average {loadavg()}")
    rounds = []
    for i in range(repeat):
        r = {size: {fmt: time_decode(paths, spec) for fmt, paths in formats.items()}
             for size, formats in sets.items()}
        r["loadavg"] = loadavg()
        log(f"formats: round {i + 1} of {repeat}, load average {r['loadavg']}")
        rounds.append(r)
    fastest = {size: {fmt: max((r[size][fmt] for r in rounds), key=lambda t: t["images_per_second"])
                      for fmt in FORMATS} for size in sets}
    ratios = {size: {fmt: {"images_per_second": t["images_per_second"]
                           / fastest[size]["jpeg"]["images_per_second"],
                           "cpu_ms_per_image": t["cpu_ms_per_image"]
                           / fastest[size]["jpeg"]["cpu_ms_per_image"]}
                     for fmt, t in formats.items()} for size, formats in fastest.items()}
    return {"rounds": rounds, "fastest": fastest, "vs_jpeg": ratios,
            "file_kib": {size: {fmt: _mean_kib(paths) for fmt, paths in formats.items()}
                         for size, formats in sets.items()},
            "loadavg_end": loadavg()}


def time_decode(paths: list[str], spec) -> dict:
    from pipeline.devices import CPU_BATCH_SIZE
    from pipeline.reader import ImageReader
    from pipeline.sources import local_ref

    refs = [local_ref(p, Path(p)) for p in paths]
    for _ in ImageReader(refs[:2], spec.preprocess, CPU_BATCH_SIZE):  # warm-up: tracing
        pass
    wall, cpu = time.perf_counter(), time.process_time()
    n = sum(len(b.refs) for b in ImageReader(refs, spec.preprocess, CPU_BATCH_SIZE))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert n == len(paths), f"{len(paths) - n} of {len(paths)} bench images failed to decode"
    return {"images": n, "seconds": wall, "images_per_second": n / wall,
            "cpu_ms_per_image": 1000 * cpu / n}


def prepare(sources: list[str], out: Path, name: str, log) -> dict[str, list[str]]:
    """format -> paths of the photos in that format (written once per recipe)."""
    import pillow_heif
    from PIL import Image

    recipe = json.dumps({"sources": [(Path(p).name, os.path.getsize(p)) for p in sources],
                         "quality": QUALITY, "version": 1})
    dest = out / f"formats-{name}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    paths = {fmt: [str(dest / fmt / (Path(p).stem + SUFFIXES[fmt])) for p in sources]
             for fmt in FORMATS}
    if (dest / ".done").is_file():
        return paths
    log(f"formats: writing {len(sources)} {name} photos as {', '.join(FORMATS)} to {dest} (once)")
    for fmt in FORMATS:
        (dest / fmt).mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(sources):
        image = Image.open(src).convert("RGB")
        tiles = {"tile_size": 512} if image.width * image.height > 4e6 else {}
        image.save(paths["jpeg"][i], quality=QUALITY)
        buf = io.BytesIO()
        pillow_heif.from_pillow(image).save(buf, quality=QUALITY, **tiles)
        Path(paths["heic"][i]).write_bytes(buf.getvalue())
        image.save(paths["avif"][i], quality=QUALITY)
        image.save(paths["tiff"][i], compression="tiff_lzw")
    (dest / ".done").write_text(recipe)
    return paths


def _mean_kib(paths: list[str]) -> float:
    return sum(os.path.getsize(p) for p in paths) / len(paths) / 1024


def show(r: dict) -> None:
    print("\nformats: the CPU decode path (read, inspect, decode, crop, resize; no model), "
          "fastest round; ratios to JPEG at the same size")
    print(f"{'size':<9} {'format':<6} {'KiB':>7} {'images/s':>9} {'CPU ms/image':>13} "
          f"{'vs JPEG: images/s':>18} {'CPU':>6}")
    for size, formats in r["fastest"].items():
        for fmt, t in formats.items():
            ratio = r["vs_jpeg"][size][fmt]
            print(f"{size:<9} {fmt:<6} {r['file_kib'][size][fmt]:>7.0f} "
                  f"{t['images_per_second']:>9.1f} {t['cpu_ms_per_image']:>13.1f} "
                  f"{ratio['images_per_second']:>17.2f}x {ratio['cpu_ms_per_image']:>5.2f}x")
    print(f"load average per round: {', '.join(r_['loadavg'] for r_ in r['rounds'])}; "
          f"end {r['loadavg_end']}")
