import numpy as np
import pytest

from pipeline.models.registry import Preprocess
from pipeline.reader import ImageReader
from pipeline.sources import iter_refs

from conftest import save_photo, skimage_photo

PRE = Preprocess(224)


def reference_preprocess(path, pre=PRE):
    """TF's EfficientNet eval recipe written out by hand: full decode, centered square crop of
    224/256 of the shorter side, bicubic resize, (x - 127) / 128."""
    import tensorflow as tf

    img = tf.io.decode_image(open(path, "rb").read(), channels=3).numpy()
    h, w = img.shape[:2]
    side = int(pre.crop_fraction * min(h, w))
    top, left = (h - side + 1) // 2, (w - side + 1) // 2
    crop = img[top:top + side, left:left + side].astype(np.float32)
    resized = tf.image.resize(crop[None], (pre.size, pre.size), method="bicubic")[0].numpy()
    return (resized - 127.0) / 128.0


@pytest.fixture
def mixed(tmp_path):
    save_photo(skimage_photo("chelsea"), tmp_path / "a.jpg", quality=90)
    (tmp_path / "b.jpg").write_bytes(b"<html><body>404 Not Found</body></html>")
    save_photo(skimage_photo("coffee"), tmp_path / "c.png")
    (tmp_path / "d.png").write_bytes(b"")
    save_photo(skimage_photo("rocket"), tmp_path / "e.jpg")
    return tmp_path


def collect(directory, batch_size=2, max_pixels=90_000_000, pre=PRE):
    batches = list(ImageReader(iter_refs(str(directory)), pre, batch_size, max_pixels))
    ok = [(r.image_id, img, w, h) for b in batches for r, img, w, h in zip(b.refs, b.images, b.widths, b.heights)]
    errors = [e for b in batches for e in b.errors]
    return ok, errors


def test_preprocessing_matches_the_published_eval_recipe(mixed):
    ok, _ = collect(mixed)
    for image_id, image, _, _ in ok:
        expected = reference_preprocess(mixed / image_id)
        np.testing.assert_allclose(image, expected, atol=2e-3, err_msg=image_id)


def test_every_input_comes_out_once_with_errors_explained(mixed):
    ok, errors = collect(mixed)
    assert [o[0] for o in ok] == ["a.jpg", "c.png", "e.jpg"]
    assert [(o[2], o[3]) for o in ok] == [(451, 300), (600, 400), (640, 427)]
    assert {e.ref.image_id: e.kind for e in errors} == {"b.jpg": "unsupported_format",
                                                         "d.png": "empty_file"}
    assert all(e.message for e in errors)


def test_images_above_max_pixels_are_refused(mixed):
    ok, errors = collect(mixed, max_pixels=200_000)
    assert [o[0] for o in ok] == ["a.jpg"]  # 451x300 = 135k pixels
    too_large = sorted(e.ref.image_id for e in errors if e.kind == "too_large")
    assert too_large == ["c.png", "e.jpg"]


def test_squash_policy_resizes_the_whole_image(mixed):
    pre = Preprocess(96, crop_fraction=None, resize="bilinear", mean=(0, 0, 0), std=(1, 1, 1))
    ok, _ = collect(mixed, pre=pre)
    assert ok[0][1].shape == (96, 96, 3)
    assert ok[0][1].max() > 200  # raw 0..255 scale
