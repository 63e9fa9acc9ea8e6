"""The Ray engine on a two-node cluster (a head plus one worker node on this machine): the
worker node dies mid-run, and the run still ends with every image exactly once."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from conftest import read_summary
from test_crash import wait_for_part

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="Ray is not installed (pip install '.[ray]')")


@pytest.fixture
def two_nodes():
    """A head node that can finish the run alone (model actor + a decode task) and a worker node.

    The head has more logical CPUs than this machine has cores: Ray schedules by them, and the
    run's actor plan must still fit on the head once the worker node is gone."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "object_store_memory": 150 * 2**20, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2, object_store_memory=150 * 2**20)
    cluster.wait_for_nodes()
    yield cluster, worker
    cluster.shutdown()


def _rows_per_image(out) -> dict[str, int]:
    table = pads.dataset(str(out), format="parquet").to_table(columns=["image_id"])
    counts = pc.value_counts(table.column("image_id")).to_pylist()
    return {c["values"]: c["counts"] for c in counts}


def test_worker_node_killed_mid_run_every_image_exactly_once(two_nodes, replicas, cli_env,
                                                            cli, tmp_path):
    cluster, worker = two_nodes
    inputs, out = replicas(1), tmp_path / "out"  # ~20 photos: 5 parts of 4
    expected = sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*") if p.is_file())
    args = ["label", inputs, out, "--engine", "ray", "--ray-address", cluster.address,
            "--runtime", "keras", "--batch-size", "4", "--part-size", "4", "--json",
            "--progress", "none"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_part(out, proc, timeout=300), proc.communicate()[1][-3000:]
        assert len(list(out.glob("part-*.parquet"))) < len(expected) // 4, "killed too late"
        killed_at = time.monotonic()
        cluster.remove_node(worker, allow_graceful=False)  # SIGKILL: raylet, workers, store
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"worker node killed; the run exited {proc.returncode} "
          f"{time.monotonic() - killed_at:.1f}s later")
    if proc.returncode != 0:  # Ray could not finish without the node: the same command resumes
        assert proc.returncode == 4, stderr[-3000:]
        again = cli(*args, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert read_summary(again)["skipped"] > 0
    else:
        assert json.loads(stdout.strip().splitlines()[-1])["labeled"] == len(expected)
    counts = _rows_per_image(out)
    assert sorted(counts) == expected  # nothing lost
    assert set(counts.values()) == {1}  # nothing twice
