"""keras.applications ImageNet networks, built by Keras' own code, with weights that never download.

Each network is built with `weights=None` and loaded from the file Keras itself would have
downloaded (found in Keras' cache, `$KERAS_HOME/models/`) or from `--weights FILE`.

Normalization is the network's own `keras.applications.<module>.preprocess_input` written as
per-channel mean/std (tests compare the two). The crop policy is the one behind the published
top-1: Keras' table (keras.io/api/applications, the keras-applications README) reports a
"single center crop": the shorter side resized to size / 0.875, then a centered size x size
crop, i.e. a square of 0.875 of the shorter side. EfficientNet, EfficientNetV2 and ConvNeXt
come from their authors' evaluation code instead (see the comments in the table).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from ..exitcodes import ConfigError
from ..types import ModelRequest, ModelSpec, Preprocess
from .base import ModelUnavailable, RegistryEntry, efficientnet_crop, file_sha256, normalization
from .imagenet import imagenet_labels

# keras.applications.efficientnet.IMAGENET_STDDEV_RGB
_EFFICIENTNET_STDDEV_RGB = (0.229, 0.224, 0.225)

WEIGHTS_SUFFIXES = (".h5", ".hdf5", ".keras")


@dataclass(frozen=True)
class KerasApp:
    name: str
    builder: str  # keras.applications.<builder>
    module: str  # keras.applications.<module>.preprocess_input is the network's own
    size: int
    weights_file: str  # the include_top file name keras/src/applications/<module>.py downloads
    normalization: str  # "tf" | "torch" | "caffe" | "raw" (the network normalizes inside)
    crop_fraction: float | None
    resize: str
    params_millions: float  # keras.io/api/applications unless noted
    top1: float

    def preprocess(self) -> Preprocess:
        return Preprocess(self.size, self.crop_fraction, self.resize, **normalization(self.normalization))


_KERAS_TABLE_CROP = 0.875  # Keras' "single center crop" (module docstring)


def _app(name, builder, module, size, weights_file, norm, params, top1,
         crop=_KERAS_TABLE_CROP, resize="bilinear") -> KerasApp:
    return KerasApp(name, builder, module, size, weights_file, norm, crop, resize, params, top1)


def _resnet_file(weights_name: str) -> str:
    return f"{weights_name}_weights_tf_dim_ordering_tf_kernels.h5"


def _efficientnet(b: int, size: int, params: float, top1: float) -> KerasApp:
    # Checkpoints and top-1 from TF's EfficientNet (tpu/models/official/efficientnet):
    # preprocessing.py crops size/(size+32) and resizes bicubic; Keras normalizes inside.
    return _app(f"efficientnet_b{b}", f"EfficientNetB{b}", "efficientnet", size,
                f"efficientnetb{b}.h5", "raw", params, top1,
                crop=efficientnet_crop(size), resize="bicubic")


def _efficientnet_v2(variant: str, builder: str, size: int, params: float, top1: float) -> KerasApp:
    # google/automl efficientnetv2/preprocessing.py preprocess_for_eval: center crop of
    # size/(size+32) below 320 px, the whole image from 320 px up; bilinear. Keras normalizes
    # B0-B3 with V1's mean/std, i.e. automl's legacy "effnetv1_" preprocessing, which resizes
    # bicubic (and crops the same way at these sizes).
    v1_recipe = variant.startswith("b")
    return _app(f"efficientnetv2_{variant}", builder, "efficientnet_v2", size,
                f"efficientnetv2-{variant}.h5", "raw", params, top1,
                crop=efficientnet_crop(size) if size < 320 else None,
                resize="bicubic" if v1_recipe else "bilinear")


def _convnext(variant: str, builder: str, params: float, top1: float) -> KerasApp:
    # facebookresearch/ConvNeXt: eval at 224 with crop_pct 0.875, bicubic. Params and top-1 from
    # the paper (tiny/small ImageNet-1k; base/large/xlarge ImageNet-22k then 1k, as Keras ships).
    return _app(f"convnext_{variant}", builder, "convnext", 224,
                f"convnext_{variant}.h5", "raw", params, top1, resize="bicubic")


APPS: tuple[KerasApp, ...] = (
    # The seed recipe's network. Inception/Xception/MobileNet/NASNet were evaluated by Keras
    # with the single center crop; "tf" mode = x / 127.5 - 1.
    _app("inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", 299,
         "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels.h5", "tf", 55.9, 80.3),
    _app("inception_v3", "InceptionV3", "inception_v3", 299,
         "inception_v3_weights_tf_dim_ordering_tf_kernels.h5", "tf", 23.9, 77.9),
    _app("xception", "Xception", "xception", 299,
         "xception_weights_tf_dim_ordering_tf_kernels.h5", "tf", 22.9, 79.0),
    # ResNet v1 and VGG are Caffe ports ("caffe": BGR, ImageNet mean, no scaling); their Caffe
    # eval is the same 224-of-256 center crop.
    _app("resnet50", "ResNet50", "resnet", 224, _resnet_file("resnet50"), "caffe", 25.6, 74.9),
    _app("resnet101", "ResNet101", "resnet", 224, _resnet_file("resnet101"), "caffe", 44.7, 76.4),
    _app("resnet152", "ResNet152", "resnet", 224, _resnet_file("resnet152"), "caffe", 60.4, 76.6),
    _app("resnet50_v2", "ResNet50V2", "resnet_v2", 224, _resnet_file("resnet50v2"), "tf", 25.6, 76.0),
    _app("resnet101_v2", "ResNet101V2", "resnet_v2", 224, _resnet_file("resnet101v2"), "tf", 44.7, 77.2),
    _app("resnet152_v2", "ResNet152V2", "resnet_v2", 224, _resnet_file("resnet152v2"), "tf", 60.4, 78.0),
    _app("mobilenet", "MobileNet", "mobilenet", 224, "mobilenet_1_0_224_tf.h5", "tf", 4.3, 70.4),
    _app("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224,
         "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5", "tf", 3.5, 71.3),
    # MobileNetV3 rescales inside the model; params and top-1 from keras' mobilenet_v3.py table
    # (TF-slim checkpoints, evaluated with the 0.875 center crop).
    _app("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224,
         "weights_mobilenet_v3_small_224_1.0_float.h5", "raw", 2.9, 68.1),
    _app("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224,
         "weights_mobilenet_v3_large_224_1.0_float.h5", "raw", 5.4, 75.6),
    # DenseNet: ports of the original Torch models ("torch": /255, ImageNet mean/std).
    _app("densenet121", "DenseNet121", "densenet", 224,
         "densenet121_weights_tf_dim_ordering_tf_kernels.h5", "torch", 8.1, 75.0),
    _app("densenet169", "DenseNet169", "densenet", 224,
         "densenet169_weights_tf_dim_ordering_tf_kernels.h5", "torch", 14.3, 76.2),
    _app("densenet201", "DenseNet201", "densenet", 224,
         "densenet201_weights_tf_dim_ordering_tf_kernels.h5", "torch", 20.2, 77.3),
    _efficientnet(0, 224, 5.3, 77.1),
    _efficientnet(1, 240, 7.9, 79.1),
    _efficientnet(2, 260, 9.2, 80.1),
    _efficientnet(3, 300, 12.3, 81.6),
    _efficientnet(4, 380, 19.5, 82.9),
    _efficientnet(5, 456, 30.6, 83.6),
    _efficientnet(6, 528, 43.3, 84.0),
    _efficientnet(7, 600, 66.7, 84.3),
    _efficientnet_v2("b0", "EfficientNetV2B0", 224, 7.2, 78.7),
    _efficientnet_v2("b1", "EfficientNetV2B1", 240, 8.2, 79.8),
    _efficientnet_v2("b2", "EfficientNetV2B2", 260, 10.2, 80.5),
    _efficientnet_v2("b3", "EfficientNetV2B3", 300, 14.5, 82.0),
    _efficientnet_v2("s", "EfficientNetV2S", 384, 21.6, 83.9),
    _efficientnet_v2("m", "EfficientNetV2M", 480, 54.4, 85.3),
    _efficientnet_v2("l", "EfficientNetV2L", 480, 119.0, 85.7),
    _convnext("tiny", "ConvNeXtTiny", 28.6, 82.1),
    _convnext("small", "ConvNeXtSmall", 50.2, 83.1),
    _convnext("base", "ConvNeXtBase", 88.6, 85.8),
    _convnext("large", "ConvNeXtLarge", 197.8, 86.6),
    _convnext("xlarge", "ConvNeXtXLarge", 350.2, 87.0),
    _app("nasnet_mobile", "NASNetMobile", "nasnet", 224, "nasnet_mobile.h5", "tf", 5.3, 74.4),
    _app("nasnet_large", "NASNetLarge", "nasnet", 331, "nasnet_large.h5", "tf", 88.9, 82.5),
    _app("vgg16", "VGG16", "vgg16", 224, "vgg16_weights_tf_dim_ordering_tf_kernels.h5", "caffe", 138.4, 71.3),
    _app("vgg19", "VGG19", "vgg19", 224, "vgg19_weights_tf_dim_ordering_tf_kernels.h5", "caffe", 143.7, 71.3),
)

BY_NAME = {app.name: app for app in APPS}


def keras_home() -> str:
    """Keras' cache root as keras/src/backend/config.py computes it (without importing Keras)."""
    if "KERAS_HOME" in os.environ:
        return os.environ["KERAS_HOME"]
    home = os.path.expanduser("~")
    return os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")


def cached_weights(app: KerasApp) -> str | None:
    """The weights file in Keras' download cache, if a previous download left it there."""
    home = keras_home()
    candidates = [home]
    if not os.access(home, os.W_OK):  # keras' get_file then falls back to /tmp/.keras
        candidates.append(os.path.join("/tmp", ".keras"))
    for root in candidates:
        path = os.path.join(os.path.expanduser(root), "models", app.weights_file)
        if os.path.isfile(path):
            return path
    return None


def build(app: KerasApp):
    """The untrained network, exactly as keras.applications builds it (nothing downloads)."""
    import keras

    builder = getattr(keras.applications, app.builder)
    return builder(weights=None, include_top=True, input_shape=(app.size, app.size, 3),
                   classes=1000, classifier_activation="softmax")


def load(name: str, weights_path: str):
    """The network `name` with its ImageNet weights read from `weights_path` (a ModelSpec's
    loader: called by name, see types.ModelSpec)."""
    app = BY_NAME[name]
    model = build(app)
    # Keras warns once per layer it skips (~200 lines for another network's file) and may then
    # carry on with random weights: collect the warnings, and a skipped layer is an error too.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(weights_path)
        except Exception as e:  # h5py / Keras raise many types for a file that does not fit
            raise ConfigError(_wrong_weights(app, weights_path, _gist(str(e)) or type(e).__name__)) from e
    skipped = [w for w in caught if "Skipping" in str(w.message)]
    if skipped:
        raise ConfigError(_wrong_weights(app, weights_path, f"{len(skipped)} layer(s) or "
                                         f"containers not found in it ({_gist(str(skipped[0].message))})"))
    if app.module == "efficientnet":
        _fold_imagenet_rescaling(model)
    return model


def _wrong_weights(app: KerasApp, path: str, why: str) -> str:
    return (f"{path} does not hold {app.name} ({app.builder}) ImageNet weights: {why.rstrip('.')}. Use the "
            f"file Keras downloads for {app.builder} or a save_weights() file of that network")


def _gist(message: str, limit: int = 400) -> str:
    """One readable line of a Keras message: its first sentence, plus the next line if the first
    ends in ':' (where Keras puts the detail); long tensor dumps are cut at `limit` characters."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    text = text.split(" Target variable:")[0]  # what follows is the whole tensor
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _fold_imagenet_rescaling(model) -> None:
    """Make a weights=None EfficientNetB* compute what keras builds with weights="imagenet".

    With "imagenet" Keras inserts Rescaling(1 / sqrt(stddev)) right after the Normalization layer
    (keras/src/applications/efficientnet.py, tensorflow issue 49930). Dividing
    (x - mean) / sqrt(var) by sqrt(stddev) is normalizing with variance var * stddev, so the
    factor goes into the loaded variance; the weights file itself is left as Keras wrote it.
    """
    import keras
    import numpy as np

    norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
    mean, variance, count = norm.get_weights()
    norm.set_weights([mean, variance * np.asarray(_EFFICIENTNET_STDDEV_RGB, variance.dtype), count])
    norm.finalize_state()  # the layer computes with tensors derived from its variables


def _offline(app: KerasApp) -> str:
    return "cached" if cached_weights(app) else "needs download"


def _missing_weights_message(app: KerasApp) -> str:
    cache = os.path.join(keras_home(), "models", app.weights_file)
    return (f"{app.name} weights are not on this machine and pipeline never downloads. Either put "
            f"Keras' file there: {cache} (on a host with internet, "
            f"`python -c \"import keras; keras.applications.{app.builder}()\"` downloads it into "
            f"~/.keras/models/), or pass --weights FILE. The default model, efficientnet_lite0, "
            f"works offline.")


def _make_spec(app: KerasApp, request: ModelRequest) -> ModelSpec:
    path: str | None
    if request.weights:
        path, source = request.weights, f"file {request.weights}"
        if not path.endswith(WEIGHTS_SUFFIXES):
            raise ConfigError(f"--weights for {app.name} must be a Keras weights file "
                              f"({', '.join(WEIGHTS_SUFFIXES)}); got {path}")
    else:
        path = cached_weights(app)
        if path is None:
            raise ModelUnavailable(_missing_weights_message(app))
        source = f"keras cache {path}"
    sha = file_sha256(path)
    return ModelSpec(app.name, app.preprocess(), imagenet_labels(), source, sha,
                     f"{__name__}:load", (app.name, path))


def _entry(app: KerasApp) -> RegistryEntry:
    return RegistryEntry(app.name, app.size, "keras cache", app.params_millions, app.top1,
                         lambda request: _offline(app), lambda request: _make_spec(app, request))


def entries() -> list[RegistryEntry]:
    return [_entry(app) for app in APPS]
