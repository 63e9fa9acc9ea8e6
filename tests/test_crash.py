"""Crash safety end to end: the real CLI in subprocesses, real SIGKILL/SIGTERM/SIGINT, real
concurrent runs, a real full and a real read-only filesystem; the output read back as a user would."""
import contextlib
import fcntl
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

import pyarrow.parquet as pq
import pytest

from conftest import chaos, labeled_rows, latest, read_summary, run_cli


def start_cli(args, env, log_path):
    with open(log_path, "w") as log:  # a file: a full pipe would block the child
        return subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def summary_in_log(path):
    """The --json summary among the lines a run wrote (stdout and stderr share the log file)."""
    line = [s for s in path.read_text().splitlines() if s.startswith("{")][-1]
    return json.loads(line)


def assert_exactly_once(output, input_dir, reference=None):
    report = chaos.verify(input_dir, output, reference)
    assert (report.rows, report.duplicates, report.missing, report.extra) == (report.inputs, 0, 0, 0)
    assert not report.leftovers, report.leftovers
    return report


# -- the done-when test: SIGKILL at random moments, every input exactly once -----------------

def test_sigkill_at_random_moments_then_every_input_exactly_once_with_its_label(
        cli_env, replicas, reference, tmp_path):
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    inputs = replicas(100)
    n_inputs = sum(1 for _ in inputs.rglob("*.jpg"))
    assert n_inputs >= 2000
    c = chaos.Chaos(inputs, tmp_path / "out", tmp_path, cli_env, part_size=50,
                    rng=random.Random(seed))
    plan = ["model_load", "part_write", "random", "after_rename", "part_write", "model_load"]
    for i, strategy in enumerate(plan):
        k = c.kill_once(strategy, f"kill{i}")
        assert k.killed and k.returncode == -signal.SIGKILL, (seed, k)
    for extra in range(3):  # the inotify race is usually won; retry until one kill lands mid-write
        if any(k.left_temp for k in c.kills):
            break
        c.kill_once("part_write", f"extra{extra}")
    kills = c.kills
    assert any(k.left_temp for k in kills), (seed, kills)  # killed during a part write
    assert all(k.committed == 0 for k in kills if k.strategy == "model_load"), (seed, kills)
    assert sum(k.committed for k in kills) > 0, (seed, kills)  # the killed runs made progress
    # README: a kill loses "fewer than --part-size, plus at most three batches" (50 - 1 + 3 * 32)
    assert (c.part_size, c.batch_size) == (50, 32)
    assert all(k.redone <= 50 - 1 + 3 * 32 for k in kills), (seed, kills)
    assert c.run_to_completion("final") == 0, (tmp_path / "final.log").read_text()
    report = chaos.verify(inputs, tmp_path / "out", reference)
    assert report.ok, (seed, report)
    assert report.rows == n_inputs and report.wrong_labels == 0


# -- incremental runs --------------------------------------------------------------------------

def test_ten_new_files_label_ten(cli, replicas, tmp_path):
    """(A second run with nothing new: test_cli.py::test_second_run_labels_nothing_and_says_so.)"""
    inputs = replicas(1)
    out = tmp_path / "out"
    assert cli("label", inputs, out).returncode == 0
    new = sorted(inputs.rglob("*.jpg"))[:10]
    for i, p in enumerate(new):
        (p.parent / f"new-{i}.jpg").write_bytes(p.read_bytes())
    third = cli("label", inputs, out, "--json")
    summary = read_summary(third)
    assert third.returncode == 0 and summary["labeled"] == 10 and summary["skipped"] == 20
    assert_exactly_once(out, inputs)


# -- one writer per OUTPUT ---------------------------------------------------------------------

def test_a_second_run_on_a_locked_output_is_refused_with_the_holder(cli_env, replicas, tmp_path):
    inputs, out = replicas(2), tmp_path / "out"
    first = start_cli(["label", inputs, out], cli_env, tmp_path / "first.log")
    try:
        assert chaos.wait_for_lock(out, first)
        os.kill(first.pid, signal.SIGSTOP)  # hold the lock for as long as the others need
        others = [subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)],
                                   env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for args in (["label", inputs, out], ["compact", out])]
        refusals = [(p.wait(300), p.communicate()[1]) for p in others]
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(300) == 0, (tmp_path / "first.log").read_text()
    for code, stderr in refusals:
        assert code == 3, stderr
        assert f"pid {first.pid} on host {socket.gethostname()}, started 20" in stderr
    assert_exactly_once(out, inputs)


def test_deleting_the_lock_file_under_a_live_run_does_not_let_a_second_run_in(
        cli_env, replicas, tmp_path):
    inputs, out = replicas(2), tmp_path / "out"
    first = start_cli(["label", inputs, out], cli_env, tmp_path / "first.log")
    try:
        assert chaos.wait_for_lock(out, first)
        os.kill(first.pid, signal.SIGSTOP)
        (out / "_lock").unlink()  # what the old "locked" message invited
        second = run_cli(["label", inputs, out], cli_env)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 3, second.stderr
    assert "output is locked" in second.stderr and "_lock" not in second.stderr
    assert first.wait(300) == 0, (tmp_path / "first.log").read_text()
    assert_exactly_once(out, inputs)


def test_two_runs_started_together_one_proceeds_no_corruption(cli_env, replicas, tmp_path):
    """Both runs race for the lock at the same moment, and neither can finish before the other
    has tried: each reads its INPUT, a manifest FIFO, before it takes the lock, and both get the
    whole manifest and its end together, once both are reading. The run that holds the lock is
    then stopped (SIGSTOP) until the other has ended: that one must find OUTPUT locked (exit 3).
    If the lock let both in, the other labels everything while the holder waits: [0, 0]."""
    inputs, out = replicas(3), tmp_path / "out"
    out.mkdir()
    lines = [f"{p.relative_to(inputs).as_posix()}\n" for p in sorted(inputs.rglob("*.jpg"))]
    fifos = [inputs / f"list{i}.txt" for i in range(2)]  # relative lines: ids as in `inputs`
    feeds = []
    for fifo in fifos:
        os.mkfifo(fifo)
        feeds.append(os.open(fifo, os.O_RDWR))  # a writer exists: the run's open returns at once
    logs = [tmp_path / f"{i}.log" for i in range(2)]
    try:
        procs = [start_cli(["label", fifo, out, "--json"], cli_env, log) for fifo, log in zip(fifos, logs)]
        assert wait_until(lambda: all(reads_file(p.pid, f) for p, f in zip(procs, fifos)), 300), \
            [log.read_text() for log in logs]
        for feed in feeds:
            os.write(feed, "".join(lines).encode())
    finally:
        for feed in feeds:
            os.close(feed)  # end of the manifest
    holder = lock_holder(out, procs)
    holder.send_signal(signal.SIGSTOP)
    try:
        other = procs[1 - procs.index(holder)]
        other.wait(600)
    finally:
        holder.send_signal(signal.SIGCONT)
    codes = [p.wait(600) for p in procs]
    assert sorted(codes) == [0, 3], (codes, [log.read_text() for log in logs])
    assert "output is locked by pid" in logs[codes.index(3)].read_text()
    assert_exactly_once(out, inputs)


def wait_until(condition, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def lock_holder(out, procs, timeout=300):
    """The process among `procs` whose pid OUTPUT's lock names, once one holds it."""
    holder = []

    def held():
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = json.loads((out / "_lock").read_text())["pid"]
            holder[:] = [p for p in procs if p.pid == pid]
        return bool(holder) or all(p.poll() is not None for p in procs)

    assert wait_until(held, timeout) and holder, [p.poll() for p in procs]
    return holder[0]


def reads_file(pid, path):
    """Whether process `pid` has `path` open."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
    return False


# -- signals -----------------------------------------------------------------------------------

def wait_for_part(out, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if list(out.glob("part-*.parquet")):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_commits_what_is_finished_and_a_rerun_completes(
        cli_env, replicas, tmp_path, sig):
    inputs, out = replicas(3), tmp_path / "out"
    proc = start_cli(["label", inputs, out, "--part-size", "10", "--batch-size", "8", "--json"],
                     cli_env, tmp_path / "run.log")
    assert wait_for_part(out, proc)
    proc.send_signal(sig)
    assert proc.wait(120) == 130
    summary = summary_in_log(tmp_path / "run.log")
    assert summary["message"] == "interrupted, run the same command again to resume"
    rows = labeled_rows(out)
    assert len(rows) == summary["labeled"] > 0 and rows.image_id.is_unique  # finished = committed
    assert summary["labeled"] < 60
    rerun = run_cli(["label", inputs, out, "--json"], cli_env)
    assert rerun.returncode == 0 and read_summary(rerun)["labeled"] == 60 - len(rows)
    assert_exactly_once(out, inputs)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])  # SIGHUP: ssh or cron's session ended
def test_a_signal_during_model_load_exits_130_with_the_message(cli_env, originals, tmp_path, sig,
                                                              sighup_not_ignored):
    """An empty model cache: the run converts the weights after it took the lock, and says so
    first (a first run's load takes a minute here; with the cache warm it is under a second)."""
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = start_cli(["label", originals, out], {**cli_env, "XDG_CACHE_HOME": str(tmp_path / "cache")}, log)
    assert chaos.wait_for_lock(out, proc)
    assert wait_until(lambda: "converting efficientnet_lite0" in log.read_text() or proc.poll() is not None, 300)
    proc.send_signal(sig)
    assert proc.wait(120) == 130
    assert "interrupted, run the same command again to resume" in (tmp_path / "run.log").read_text()
    assert not list(out.glob("part-*")) and not list(out.glob("_tmp-*"))


def test_sigterm_while_the_listing_is_slow_ends_the_run_promptly(cli_env, originals, tmp_path):
    """The listing runs in a tf.data thread while the main thread waits for a batch; a signal
    then must not wait for the listing (here a manifest fed slowly through a FIFO) to end."""
    photos = sorted(originals.glob("*.jpg"))
    fifo, out = tmp_path / "list.txt", tmp_path / "out"
    os.mkfifo(fifo)
    proc = start_cli(["label", fifo, out, "--json"], cli_env, tmp_path / "run.log")
    writer = open_fifo_when_read(fifo, proc)
    try:
        writer.write(f"{photos[0]}\n")
        writer.flush()
        assert wait_until(lambda: unread_bytes(writer) == 0, 120)  # the run has read it
        proc.send_signal(signal.SIGTERM)
        lines_after_signal = 0
        for p in photos[1:]:  # the listing goes on, slowly: a line every 0.5 s
            try:
                writer.write(f"{p}\n")
                writer.flush()
            except BrokenPipeError:  # the run has ended and closed the manifest
                break
            lines_after_signal += 1
            time.sleep(0.5)
        assert proc.wait(60) == 130, (tmp_path / "run.log").read_text()
        assert lines_after_signal <= 3  # it stopped while the listing was still going
    finally:
        with contextlib.suppress(BrokenPipeError):
            writer.close()
        if proc.poll() is None:
            proc.kill()
    summary = summary_in_log(tmp_path / "run.log")
    assert summary["message"] == "interrupted, run the same command again to resume"
    assert len(list(out.glob("part-*.parquet"))) == summary["parts_written"] <= 1


def unread_bytes(pipe) -> int:
    """Bytes written to a FIFO that its reader has not read yet (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def open_fifo_when_read(fifo, proc, timeout=120):
    """Open the FIFO for writing once the CLI opened it for reading (its listing started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            time.sleep(0.05)
            continue
        os.set_blocking(fd, True)
        return os.fdopen(fd, "w")
    raise AssertionError("the CLI never opened the manifest")


# -- output failures: a full disk, a read-only filesystem --------------------------------------

def test_a_full_disk_is_a_clear_error_nothing_half_written_and_the_next_run_resumes(
        cli_env, replicas, small_fs, tmp_path):
    inputs, fs = replicas(5), small_fs("1m")
    out = fs / "out"
    filler = fs / "filler"
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    filler.write_bytes(b"\0" * (free - 24 * 1024))  # room for a few parts of 10 rows
    proc = run_cli(["label", inputs, out, "--part-size", "10", "--batch-size", "8"], cli_env)
    assert proc.returncode == 4, proc.stderr
    assert "No space left on device" in proc.stderr and "run the same command again" in proc.stderr
    assert not [n for n in os.listdir(out) if n.startswith("_tmp")]
    parts = sorted(out.glob("part-*.parquet"))
    assert parts and all(pq.read_metadata(p).num_rows == 10 for p in parts)  # whole parts only
    committed = len(labeled_rows(out))
    filler.unlink()
    rerun = run_cli(["label", inputs, out, "--part-size", "10", "--json"], cli_env)
    assert rerun.returncode == 0, rerun.stderr
    assert read_summary(rerun)["labeled"] == 100 - committed
    assert_exactly_once(out, inputs)


def test_a_read_only_output_is_a_clear_error_and_the_next_run_resumes(
        cli_env, replicas, small_fs, tmp_path):
    inputs, fs = replicas(1), small_fs("4m")
    out = fs / "out"
    assert run_cli(["label", inputs, out], cli_env).returncode == 0
    before = sorted(os.listdir(out))
    for i, p in enumerate(sorted(inputs.rglob("*.jpg"))[:3]):
        (p.parent / f"new-{i}.jpg").write_bytes(p.read_bytes())
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    try:
        proc = run_cli(["label", inputs, out], cli_env)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=True)
    assert proc.returncode == 4, proc.stderr
    assert "not writable: Read-only file system" in proc.stderr
    assert sorted(os.listdir(out)) == before
    rerun = run_cli(["label", inputs, out, "--json"], cli_env)
    assert rerun.returncode == 0 and read_summary(rerun)["labeled"] == 3
    assert_exactly_once(out, inputs)


# -- --overwrite -------------------------------------------------------------------------------

def test_overwrite_relabels_everything_and_drops_the_old_rows_when_it_completes(cli, originals,
                                                                                tmp_path):
    out = tmp_path / "out"
    assert cli("label", originals, out, "--part-size", "8").returncode == 0
    proc = cli("label", originals, out, "--json", "--overwrite")
    summary = read_summary(proc)
    assert proc.returncode == 0 and summary["labeled"] == 20 and summary["parts_replaced"] == 3
    rows = labeled_rows(out)
    assert len(rows) == 20 and set(rows.run_id) == {summary["run_id"]}
    assert not list(out.glob("_overwrite-*"))


def test_a_killed_overwrite_keeps_a_complete_answer_and_any_next_run_finishes_it(
        cli_env, replicas, tmp_path):
    inputs, out = replicas(4), tmp_path / "out"
    first = run_cli(["label", inputs, out, "--part-size", "10", "--json"], cli_env)
    first_run = read_summary(first)["run_id"]
    c = chaos.Chaos(inputs, out, tmp_path, cli_env, part_size=10, extra_args=["--overwrite"])
    for attempt, flags in enumerate([["--overwrite"], []]):  # killed; re-run without the flag, killed
        c.extra_args = flags
        k = c.kill_once("after_rename", f"overwrite{attempt}")
        assert k.killed and k.committed > 0
        assert len(list(out.glob("_overwrite-*.json"))) == 1  # the same unfinished overwrite
        answer = latest(out)  # old rows still answer for what the overwrite has not reached
        assert len(answer) == 80 and answer.image_id.is_unique
        assert (answer.run_id != first_run).sum() == sum(k.committed for k in c.kills)
        assert len(labeled_rows(out)) == 80 + sum(k.committed for k in c.kills)
    assert "continuing the unfinished --overwrite run overwrite0" in \
        (tmp_path / "overwrite1.log").read_text()
    rerun = run_cli(["label", inputs, out, "--part-size", "10", "--overwrite"], cli_env)
    assert rerun.returncode == 0, rerun.stderr
    assert "continuing the unfinished --overwrite run overwrite0" in rerun.stderr
    assert f"labeled {80 - sum(k.committed for k in c.kills)}," in rerun.stderr
    rows = labeled_rows(out)
    assert first_run not in set(rows.run_id) and not list(out.glob("_overwrite-*"))
    assert_exactly_once(out, inputs)
