"""`pipeline compact`: the latest row per (image_id, model), rewritten atomically; real kills."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import chaos, labeled_rows, latest, read_summary, run_cli


def key(df):
    return sorted(zip(df.image_id, df.run_id, df.labeled_at))


@pytest.fixture(scope="module")
def relabeled_once(cli_env, originals, tmp_path_factory):
    """20 photos labeled, then 3 of them changed (mtime) and labeled again: 23 rows."""
    tmp_path = tmp_path_factory.mktemp("relabeled")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in originals.glob("*.jpg"):
        (inputs / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    assert run_cli(["label", inputs, out, "--part-size", "4"], cli_env).returncode == 0
    changed = sorted(inputs.glob("*.jpg"))[:3]
    for p in changed:
        os.utime(p, ns=(time.time_ns(), time.time_ns()))
    again = run_cli(["label", inputs, out, "--json"], cli_env)
    assert read_summary(again)["labeled"] == 3  # a changed file is labeled again
    return inputs, out, {p.name for p in changed}


@pytest.fixture
def relabeled(relabeled_once, tmp_path):
    """A private copy of relabeled_once (file times kept, so the done set still matches)."""
    inputs, out, changed = relabeled_once
    shutil.copytree(inputs, tmp_path / "in")
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "in", tmp_path / "out", changed


def test_compact_keeps_the_latest_row_of_each_image_like_the_documented_query(cli, relabeled):
    inputs, out, changed = relabeled
    before = latest(out)
    assert len(labeled_rows(out)) == 23 and len(before) == 20
    newest_run = sorted(before.run_id)[-1]
    assert set(before[before.run_id == newest_run].image_id) == changed
    proc = cli("compact", out, "--part-size", "8")
    assert proc.returncode == 0, proc.stderr
    assert "23 -> 20 rows" in proc.stderr
    rows = labeled_rows(out)
    assert len(rows) == 20 and rows.image_id.is_unique
    assert key(rows) == key(before)  # the same rows, untouched: run_id and labeled_at kept
    assert len(list(out.glob("part-*.parquet"))) == 3
    assert not [n for n in os.listdir(out) if n.startswith(("_tmp", "_staged", "_compact"))]
    assert read_summary(cli("label", inputs, out, "--json"))["labeled"] == 0  # still done
    assert "nothing to compact" in cli("compact", out, "--part-size", "8").stderr


def kill_compact_on(cli_env, out, tmp_path, mask, prefix):
    """Run `pipeline compact`, SIGKILL it the moment inotify reports `prefix` appearing."""
    watch = chaos.DirWatch(out)
    log = open(tmp_path / "compact.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "compact", str(out),
                             "--part-size", "2"], env=cli_env, stdout=log, stderr=log)
    killed = False
    try:
        while proc.poll() is None and not killed:
            for m, name in watch.events(0.2):
                if m & mask and name.startswith(prefix):
                    killed = chaos._kill(proc)
                    break
    finally:
        watch.close()
        log.close()
    proc.wait(60)
    return killed


def test_a_compaction_killed_while_writing_is_rolled_back(cli, cli_env, relabeled, tmp_path):
    inputs, out, _ = relabeled
    rows_before = key(labeled_rows(out))
    assert kill_compact_on(cli_env, out, tmp_path, chaos.IN_CREATE, "_tmp-_staged-")
    assert key(labeled_rows(out)) == rows_before  # readers see exactly the old parts
    assert list(out.glob("_compact-*.json"))
    proc = cli("label", inputs, out, "--json")  # any start recovers
    assert proc.returncode == 0 and read_summary(proc)["labeled"] == 0
    assert key(labeled_rows(out)) == rows_before
    assert not [n for n in os.listdir(out) if n.startswith(("_tmp", "_staged", "_compact"))]


def test_a_compaction_killed_while_swapping_is_finished_by_the_next_start(cli, cli_env, relabeled,
                                                                          tmp_path):
    inputs, out, _ = relabeled
    answer = key(latest(out))
    assert kill_compact_on(cli_env, out, tmp_path, chaos.IN_MOVED_TO, "part-")
    assert key(latest(out)) == answer  # duplicates may show for now, the answer is complete
    proc = cli("compact", out)
    assert proc.returncode == 0, proc.stderr
    rows = labeled_rows(out)
    assert len(rows) == 20 and key(rows) == answer
    assert not [n for n in os.listdir(out) if n.startswith(("_tmp", "_staged", "_compact"))]


def test_compact_refuses_while_an_overwrite_is_unfinished(tmp_path):
    from pipeline import store
    from pipeline.compact import compact
    from pipeline.exitcodes import ConfigError
    from pipeline.store.replace import start_overwrite

    start_overwrite(store.open_output(str(tmp_path)), "m", "r1")
    with pytest.raises(ConfigError, match="unfinished"):
        compact(str(tmp_path))
