"""The done index through the real CLI: a night saves it, the next night starts from it and merges
only the parts committed since, and follows a compaction; a run killed with SIGKILL
mid-labeling and a damaged index all end with every input labeled exactly once."""
import json
import os
import signal
import time

from pipeline import doneindex, store

from conftest import read_summary
from test_crash import assert_exactly_once, start_cli


def pointer(out):
    return doneindex.pointer_json(store.open_output(str(out)))


def covers_every_part(out):
    return [n for n, _ in pointer(out)["covered"]] == sorted(p.name for p in out.glob("part-*.parquet"))


def copy_new(inputs, n, tag):
    for i, p in enumerate(sorted(inputs.rglob("*.jpg"))[:n]):
        (p.parent / f"{tag}-{i}.jpg").write_bytes(p.read_bytes())


def test_each_night_saves_the_index_and_the_next_labels_exactly_the_new_images(cli, replicas,
                                                                                tmp_path):
    inputs, out = replicas(1), tmp_path / "out"
    first = cli("label", inputs, out, "--json")
    assert first.returncode == 0 and "done index" not in first.stderr  # none yet: no complaint
    assert covers_every_part(out)
    generation = pointer(out)["files"]["keys"]["name"]
    copy_new(inputs, 5, "new")
    second = cli("label", inputs, out, "--json")
    summary = read_summary(second)
    assert (summary["labeled"], summary["skipped"]) == (5, 20)
    assert "not used" not in second.stderr
    assert covers_every_part(out) and pointer(out)["files"]["keys"]["name"] != generation
    third = cli("label", inputs, out, "--json")
    assert read_summary(third)["labeled"] == 0 and read_summary(third)["skipped"] == 25
    assert_exactly_once(out, inputs)


def test_a_run_killed_mid_labeling_resumes_from_the_index_and_its_parts(cli, cli_env, replicas,
                                                                         tmp_path):
    inputs, out = replicas(3), tmp_path / "out"
    some = sorted(inputs.rglob("*.jpg"))
    hidden = some[20:]
    for p in hidden:  # night one sees 20 images
        p.rename(p.with_suffix(".later"))
    assert cli("label", inputs, out).returncode == 0
    for p in hidden:
        p.with_suffix(".later").rename(p)
    indexed = pointer(out)["covered"]
    proc = start_cli(["label", inputs, out, "--part-size", "5", "--batch-size", "4"], cli_env,
                     tmp_path / "killed.log")
    before = set(out.glob("part-*.parquet"))
    try:
        committed = wait_until(lambda: set(out.glob("part-*.parquet")) - before, proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert committed
    assert pointer(out)["covered"] == indexed  # the killed run never got to save it
    again = cli("label", inputs, out, "--json")
    summary = read_summary(again)
    assert again.returncode == 0 and summary["skipped"] >= 25  # 20 + the killed run's parts
    assert summary["labeled"] + summary["skipped"] == len(some)
    assert "not used" not in again.stderr
    assert covers_every_part(out)
    assert_exactly_once(out, inputs)


def wait_until(condition, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_after_compaction_the_index_covers_the_compacted_files(cli, replicas, tmp_path):
    inputs, out = replicas(1), tmp_path / "out"
    assert cli("label", inputs, out, "--part-size", "4").returncode == 0
    parts = sorted(out.glob("part-*.parquet"))
    assert cli("compact", out).returncode == 0
    assert sorted(out.glob("part-*.parquet")) != parts and covers_every_part(out)
    copy_new(inputs, 3, "new")
    after = cli("label", inputs, out, "--json")
    summary = read_summary(after)
    assert (summary["labeled"], summary["skipped"]) == (3, 20)
    assert "not used" not in after.stderr
    assert covers_every_part(out)
    assert_exactly_once(out, inputs)


def test_a_damaged_index_is_rebuilt_and_no_new_image_counts_as_done(cli, replicas, tmp_path):
    inputs, out = replicas(1), tmp_path / "out"
    assert cli("label", inputs, out).returncode == 0
    entry = pointer(out)["files"]["id_data"]
    path = out / entry["name"]
    data = bytearray(path.read_bytes())
    data[-20:-8] = b"garbagegarba"  # same length, other ids
    path.write_bytes(bytes(data))
    copy_new(inputs, 2, "new")
    after = cli("label", inputs, out, "--json")
    assert "damaged" in after.stderr
    assert (read_summary(after)["labeled"], read_summary(after)["skipped"]) == (2, 20)
    assert json.loads((out / "_index" / "done.json").read_text())["covered"]
    assert_exactly_once(out, inputs)
