"""Which runtime, precision, batch size and devices a run uses, decided from the host's GPUs.

`plan(request, gpus)` is a pure function of the device request and a list of GPU descriptions, so
the GPU decisions are tested on a CPU-only machine; `local_gpus()` describes this host's GPUs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from .exitcodes import ConfigError
from .types import DeviceRequest, default_cache_dir

CPU_BATCH_SIZE = 64
GPU_BATCH_SIZE_PER_DEVICE = 256
# float16 tensor cores arrived with Volta (compute capability 7.0); older GPUs run it slower.
MIXED_FLOAT16_MIN_CAPABILITY = (7, 0)
KERAS_DTYPE_POLICIES = {"float32": "float32", "float16": "mixed_float16",
                        "bfloat16": "mixed_bfloat16"}
# What each --precision records as the rows' `pipeline.precision`: the Keras dtype policy, or
# int8 for LiteRT's full-integer model.
RECORDED_PRECISION = {**KERAS_DTYPE_POLICIES, "int8": "int8"}


@dataclass(frozen=True)
class Gpu:
    name: str  # TensorFlow's physical device name, e.g. "/physical_device:GPU:0"
    compute_capability: tuple[int, int] | None = None

    @property
    def logical_name(self) -> str:
        return "/GPU:" + self.name.rsplit(":", 1)[-1]


@dataclass(frozen=True)
class Plan:
    """What `plan` decided for a run: made once, on the host that starts the run, and passed to
    whatever loads the model (the local engine, Ray's actors)."""

    runtime: str  # keras | litert
    dtype_policy: str  # Keras dtype policy: float32 | mixed_float16 | mixed_bfloat16
    batch_size: int  # images per reader batch, split evenly across `devices`
    devices: tuple[str, ...]  # one model replica per entry; () = TensorFlow's default placement
    feed: str = "float32"  # what the reader hands the model: float32 input or uint8 pixels
    int8: bool = False  # litert: the full-integer (int8) quantized flatbuffer
    cache_dir: str = field(default_factory=default_cache_dir)  # litert: the flatbuffer's cache
    requested_batch_size: int | None = None  # --batch-size; None: the per-device default

    @property
    def precision(self) -> str:
        """The --precision that asks for this plan."""
        return "int8" if self.int8 else precision_of(self.dtype_policy)

    def for_worker(self, gpus: int) -> "Plan":
        """This plan on a Ray worker holding `gpus` GPUs: the same runtime, precision and feed
        (what the rows' identity records), the batch size and replicas of that worker."""
        if self.runtime == "litert":
            return self
        names = tuple(f"/GPU:{i}" for i in range(gpus))
        return dataclasses.replace(self, devices=names,
                                   batch_size=_batch_size(self.requested_batch_size, gpus))


def plan(request: DeviceRequest, gpus: Sequence[Gpu]) -> Plan:
    """Decide the runtime, precision, batch size and replicas for `request` on a host with `gpus`."""
    runtime = choose_runtime(request.runtime, request.precision, gpus)
    feed = choose_feed(request.feed, runtime)
    if runtime == "litert":
        return Plan("litert", "float32", request.batch_size or CPU_BATCH_SIZE, (), feed,
                    request.precision == "int8", request.cache_dir, request.batch_size)
    policy = choose_dtype_policy(request.precision, gpus)
    devices = tuple(g.logical_name for g in gpus)
    return Plan("keras", policy, _batch_size(request.batch_size, len(gpus)), devices, feed,
                False, request.cache_dir, request.batch_size)


def _batch_size(requested: int | None, gpus: int) -> int:
    return requested or (GPU_BATCH_SIZE_PER_DEVICE * gpus if gpus else CPU_BATCH_SIZE)


def choose_feed(feed: str, runtime: str) -> str:
    """auto: uint8 pixels to Keras (a quarter of the bytes to the device, normalized there as the
    model's first op); float32 to LiteRT (CPU only: no device copy to save, a uint8 feed would
    only move the normalization from tf.data's threads to the model's)."""
    if feed != "auto":
        return feed
    return "uint8" if runtime == "keras" else "float32"


def choose_runtime(runtime: str, precision: str, gpus: Sequence[Gpu]) -> str:
    """auto: Keras on GPU hosts; LiteRT (XNNPACK) on CPU hosts unless a reduced precision that
    only Keras offers was asked for. int8 is LiteRT's alone."""
    if precision == "int8" and (runtime == "keras" or (runtime == "auto" and gpus)):
        chosen = "--runtime keras" if runtime == "keras" else "a GPU host (--runtime auto = keras)"
        raise ConfigError(f"--precision int8 runs on --runtime litert (the CPU) only, not on "
                          f"{chosen}: pass --runtime litert, or another --precision")
    reduced = precision in ("float16", "bfloat16")
    if runtime == "litert" and reduced:
        raise ConfigError(f"--runtime litert runs float32; --precision {precision} needs --runtime keras")
    if runtime != "auto":
        return runtime
    return "keras" if gpus or reduced else "litert"


def precision_of(dtype_policy: str) -> str:
    """The --precision that asks for a Keras dtype policy (inverse of KERAS_DTYPE_POLICIES)."""
    return {policy: name for name, policy in KERAS_DTYPE_POLICIES.items()}[dtype_policy]


def choose_dtype_policy(precision: str, gpus: Sequence[Gpu]) -> str:
    """auto: mixed float16 when every GPU has float16 tensor cores, float32 otherwise."""
    if precision != "auto":
        return KERAS_DTYPE_POLICIES[precision]
    if gpus and all(g.compute_capability and g.compute_capability >= MIXED_FLOAT16_MIN_CAPABILITY
                    for g in gpus):
        return "mixed_float16"
    return "float32"


def local_gpus() -> list[Gpu]:
    """This host's GPUs, with TensorFlow memory growth turned on (allocate as needed, not all)."""
    import tensorflow as tf

    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(device, True)
        except RuntimeError:  # the GPU runtime is already initialized; growth is fixed by then
            pass
        details = tf.config.experimental.get_device_details(device)
        gpus.append(Gpu(device.name, details.get("compute_capability")))
    return gpus


def cpu_threads() -> int:
    """Cores this process may run on (honours taskset / cpusets, unlike os.cpu_count)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
