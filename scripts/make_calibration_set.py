"""Write pipeline/calibration/: the photos the int8 LiteRT model is calibrated on.

    python scripts/make_calibration_set.py

Ten photos that scikit-image ships (a dev dependency only, so the result is committed and the
package needs neither scikit-image nor the network at run time), each dedicated to the public
domain (CC0 or public domain, per scikit-image's `skimage.data` docstrings). Each gives five
views (the whole photo and four overlapping two-thirds crops), at most 256 px on the long side,
JPEG quality 85: 50 files, about 0.8 MB. quantize.py adds their mirror images. Rerunning it with
the same scikit-image and Pillow writes the same bytes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

DEST = Path(__file__).resolve().parent.parent / "pipeline" / "calibration"
# name -> licence, as scikit-image's docstring states it
PHOTOS = {
    "astronaut": "public domain (NASA)",
    "chelsea": "CC0 (Stefan van der Walt)",
    "coffee": "CC0 (Rachel Michetti)",
    "rocket": "public domain (SpaceX)",
    "hubble_deep_field": "public domain (NASA)",
    "retina": "CC0 1.0",
    "brick": "CC0 (CC0Textures)",
    "grass": "CC0",
    "gravel": "CC0 (CC0Textures)",
    "camera": "CC0 (Lav Varshney)",
}
LONG_SIDE = 256
QUALITY = 85


def views(img):
    """The whole photo and its four overlapping two-thirds crops (corners)."""
    w, h = img.size
    cw, ch = w * 2 // 3, h * 2 // 3
    yield img
    for left, top in ((0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)):
        yield img.crop((left, top, left + cw, top + ch))


def main() -> int:
    import skimage.data
    from PIL import Image

    DEST.mkdir(exist_ok=True)
    for old in DEST.glob("*.jpg"):
        old.unlink()
    for name in PHOTOS:
        pixels = getattr(skimage.data, name)()
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        photo = Image.fromarray(np.ascontiguousarray(pixels[..., :3]))
        for i, view in enumerate(views(photo)):
            view = view.copy()
            view.thumbnail((LONG_SIDE, LONG_SIDE), Image.LANCZOS)
            view.save(DEST / f"{name}_{i}.jpg", quality=QUALITY)
    lines = [f"- `{name}_*.jpg`: scikit-image `data.{name}()`, {licence}"
             for name, licence in PHOTOS.items()]
    (DEST / "LICENSES.md").write_text(
        "# Calibration photos (int8 LiteRT)\n\nWritten by `scripts/make_calibration_set.py` "
        "from scikit-image's sample data; each is public domain or CC0:\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {len(list(DEST.glob('*.jpg')))} photos to {DEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
