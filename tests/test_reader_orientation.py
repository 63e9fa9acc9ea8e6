"""EXIF orientation through the real ImageReader, against Pillow's own turn of the same file.

The reader resizes an upright full-scale photo in a branch of its own that skips the
orientation step (model_input's `plain`); these tests fail if any photo whose tag is 2-8 (turned
or mirrored) takes that branch, at full scale and with scaled decode on, small photos and
photos large enough to decode at reduced scale.
"""
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import skimage_photo
from pipeline.reader import ImageReader
from pipeline.sources import iter_refs
from pipeline.types import Preprocess, ReadLimits

PRE = Preprocess(224)
ORIENTATIONS = range(1, 9)
# (name, stored width x height): chelsea as it is (ImageNet size, never scaled) and upscaled so
# that its crop window (1050 px) decodes at 1/2 scale with scaled decode on
SIZES = {"small": (451, 300), "large": (1600, 1200)}


def tagged_jpeg(stored: np.ndarray, orientation: int) -> bytes:
    """The same stored pixels whatever the tag: only the EXIF Orientation differs."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(stored).save(out, "JPEG", quality=95, subsampling=0, exif=exif)
    return out.getvalue()


def expected_input(data: bytes) -> np.ndarray:
    """The model input worked out without the reader: Pillow decodes and turns the file
    upright (ImageOps.exif_transpose), then the eval recipe by hand: the centered square of
    0.875 of the shorter side (odd margin: half a pixel right/below), bicubic to 224,
    (x - 127) / 128."""
    import tensorflow as tf

    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    h, w = upright.shape[:2]
    side = int(np.float32(PRE.crop_fraction) * np.float32(min(h, w)))
    top, left = (h - side + 1) // 2, (w - side + 1) // 2
    crop = upright[top:top + side, left:left + side].astype(np.float32)
    resized = tf.image.resize(crop[None], (PRE.size, PRE.size), method="bicubic")[0].numpy()
    return (resized - 127.0) / 128.0


@pytest.fixture(scope="module")
def tagged_photos(tmp_path_factory):
    """Every orientation 1-8 of one asymmetric photo, small and large: {file name: bytes}."""
    d = tmp_path_factory.mktemp("tagged")
    cat = skimage_photo("chelsea")
    files = {}
    for size_name, size in SIZES.items():
        stored = np.asarray(Image.fromarray(cat).resize(size, Image.BICUBIC))
        for orientation in ORIENTATIONS:
            name = f"{size_name}{orientation}.jpg"
            files[name] = tagged_jpeg(stored, orientation)
            (d / name).write_bytes(files[name])
    return d, files


def read(directory, scaled_decode: bool) -> dict[str, np.ndarray]:
    images = {}
    limits = ReadLimits(scaled_decode=scaled_decode)
    for batch in ImageReader(iter_refs(str(directory)), PRE, 8, limits):
        assert batch.errors == [], [(e.ref.image_id, e.message) for e in batch.errors]
        images.update((ref.image_id, image) for ref, image in zip(batch.refs, batch.images))
    return images


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scaled_decode", [False, True], ids=["full-scale", "scaled-decode"])
def test_every_orientation_gives_the_pixels_pillow_turns_upright(tagged_photos, scaled_decode):
    directory, files = tagged_photos
    images = read(directory, scaled_decode)
    assert sorted(images) == sorted(files)
    expected = {name: expected_input(data) for name, data in files.items()}
    # Pillow's libjpeg vs TensorFlow's, measured: mean 0.0098 small, 0.0082 large at full
    # scale, 0.0046 large at 1/2 scale; a photo left as stored is >= 0.25 off (below)
    off = {name: float(np.abs(image - expected[name]).mean()) for name, image in images.items()}
    assert {name: d for name, d in off.items() if d >= 0.02} == {}
    for size_name in SIZES:  # a wrong turn or a missing mirror would show
        upright = expected[f"{size_name}1.jpg"]
        for orientation in range(2, 9):
            wrong = np.abs(expected[f"{size_name}{orientation}.jpg"] - upright).mean()
            assert wrong > 0.2, (size_name, orientation, wrong)
