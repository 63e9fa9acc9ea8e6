"""The device policy: runtime, precision, batch size and replicas for a host's GPUs.

The GPU lists are descriptions of hosts (name, compute capability), the input of the policy
function under test; this machine has no GPU.
"""
import pytest

from pipeline.exitcodes import ConfigError
from pipeline.types import DeviceRequest
from pipeline.devices import Gpu, plan

T4 = [Gpu("/physical_device:GPU:0", (7, 5))]
TWO_A100 = [Gpu("/physical_device:GPU:0", (8, 0)), Gpu("/physical_device:GPU:1", (8, 0))]
P100 = [Gpu("/physical_device:GPU:0", (6, 0))]
MIXED_OLD_NEW = [Gpu("/physical_device:GPU:0", (7, 0)), Gpu("/physical_device:GPU:1", (6, 1))]


def test_cpu_host_uses_litert_float32_batch_64():
    p = plan(DeviceRequest(), [])
    assert (p.runtime, p.dtype_policy, p.batch_size, p.devices) == ("litert", "float32", 64, ())


def test_gpu_host_uses_keras_mixed_float16_and_a_large_batch():
    p = plan(DeviceRequest(), T4)
    assert (p.runtime, p.dtype_policy, p.batch_size, p.devices) == ("keras", "mixed_float16", 256, ("/GPU:0",))


def test_multi_gpu_host_gets_a_replica_per_gpu_and_a_batch_per_gpu():
    p = plan(DeviceRequest(), TWO_A100)
    assert p.devices == ("/GPU:0", "/GPU:1") and p.batch_size == 512


def test_a_batch_size_the_user_set_is_kept_everywhere():
    assert plan(DeviceRequest(batch_size=32), TWO_A100).batch_size == 32
    assert plan(DeviceRequest(batch_size=8), []).batch_size == 8


@pytest.mark.parametrize("gpus, policy", [
    (P100, "float32"),  # no float16 tensor cores
    (MIXED_OLD_NEW, "float32"),  # every replica must be fast in float16
    ([Gpu("/physical_device:GPU:0", None)], "float32"),  # capability unknown
    (TWO_A100, "mixed_float16"),
])
def test_auto_precision_follows_compute_capability(gpus, policy):
    assert plan(DeviceRequest(), gpus).dtype_policy == policy


@pytest.mark.parametrize("precision, policy", [
    ("float32", "float32"), ("float16", "mixed_float16"), ("bfloat16", "mixed_bfloat16")])
def test_explicit_precision_is_applied(precision, policy):
    assert plan(DeviceRequest(precision=precision), T4).dtype_policy == policy


def test_reduced_precision_on_a_cpu_host_picks_keras():
    p = plan(DeviceRequest(precision="bfloat16"), [])
    assert (p.runtime, p.dtype_policy, p.batch_size) == ("keras", "mixed_bfloat16", 64)


def test_explicit_runtime_wins():
    assert plan(DeviceRequest(runtime="keras"), []).runtime == "keras"
    p = plan(DeviceRequest(runtime="litert"), T4)
    assert (p.runtime, p.batch_size, p.devices) == ("litert", 64, ())


def test_litert_with_reduced_precision_is_a_usage_error():
    with pytest.raises(ConfigError, match="--runtime keras"):
        plan(DeviceRequest(runtime="litert", precision="float16"), [])


def test_int8_runs_on_litert():
    for request in (DeviceRequest(precision="int8"), DeviceRequest(runtime="litert", precision="int8")):
        p = plan(request, [])
        assert (p.runtime, p.int8, p.precision, p.batch_size) == ("litert", True, "int8", 64)
    assert plan(DeviceRequest(runtime="litert", precision="int8"), T4).int8  # asked for explicitly
    assert plan(DeviceRequest(), []).precision == "float32"  # auto on a CPU host: unchanged


@pytest.mark.parametrize("request_, gpus", [
    (DeviceRequest(runtime="keras", precision="int8"), []),
    (DeviceRequest(precision="int8"), T4),  # auto on a GPU host is keras
])
def test_int8_with_a_keras_plan_is_a_usage_error(request_, gpus):
    with pytest.raises(ConfigError, match="--precision int8 .*--runtime litert"):
        plan(request_, gpus)
