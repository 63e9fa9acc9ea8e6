"""Real signals sent to this process: SIGTERM/SIGINT become Interrupted, deferred in a commit.

(That a signal ends a slow listing while the main thread waits in tf.data is tested end to end
in test_crash.py with a FIFO manifest.)
"""
import os
import signal
import time

import pytest

from pipeline import interrupts
from pipeline.interrupts import Interrupted


@pytest.fixture(autouse=True)
def clean_state():
    interrupts.reset()
    yield
    interrupts.reset()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_raises_interrupted_and_handlers_are_restored(sig, sighup_not_ignored):
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted, match=signal.Signals(sig).name):
        with interrupts.raised_on_signals():
            os.kill(os.getpid(), sig)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
    assert interrupts.requested()
    assert signal.getsignal(sig) is before


def test_an_ignored_sighup_stays_ignored_as_nohup_asks():
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with interrupts.raised_on_signals():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
        assert not interrupts.requested()
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_signal_inside_a_commit_is_raised_when_the_commit_ends():
    steps = []
    with pytest.raises(Interrupted):
        with interrupts.raised_on_signals():
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                steps.append("commit finished")
            steps.append("after the commit")
    assert steps == ["commit finished"]


# --- end to end: a signal while the main thread is stuck in native code -------------------------

def _start_cli(args, env, log_path):
    import subprocess
    import sys

    with open(log_path, "w") as log:  # a file: a full pipe would block the child
        return subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.timeout(900)
def test_sigterm_while_decodes_are_stuck_commits_and_exits_130_within_seconds(
        cli_env, originals, tmp_path):
    """The main thread waits in tf.data for a batch of slow decodes (native code: Python's
    handler cannot run). The watchdog commits what was finished and ends the run."""
    import json
    import shutil

    import badfiles as bf
    from conftest import chaos, labeled_rows, run_cli

    inputs, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "run.log"
    inputs.mkdir()
    for i, path in enumerate(sorted(originals.glob("*.jpg"))[:8]):
        shutil.copy(path, inputs / f"a{i}.jpg")
    slow = bf.slow_but_valid_jpeg()
    for i in range(8):
        (inputs / f"z_slow_{i}.jpg").write_bytes(slow)
    proc = _start_cli(["label", inputs, out, "--batch-size", "4", "--part-size", "4", "--json"],
                      cli_env, log)
    try:
        deadline = time.monotonic() + 600
        while len(list(out.glob("part-*.parquet"))) < 2:  # the 8 quick ones are committed
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(0.5)  # the main thread now waits for the slow batch
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    print(f"SIGTERM to exit: {took:.1f} s")
    assert code == 130, text[-3000:]
    assert took < 8, text[-3000:]  # GRACE_SECONDS (3) + committing + start of the exit
    assert "interrupted, run the same command again to resume" in text
    rows = labeled_rows(out)
    assert len(rows) >= 8 and rows.image_id.is_unique and (rows.status == "ok").all()
    summary = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
    assert summary["exit_code"] == 130 and summary["labeled"] + summary["errors"] == len(rows)
    rerun = run_cli(["label", inputs, out, "--json"], cli_env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = chaos.verify(inputs, out, None)
    assert (report.rows, report.duplicates, report.missing, report.extra) == (16, 0, 0, 0)


def test_an_interrupt_that_native_code_reported_as_its_own_error_is_recognized():
    import os
    import signal

    from pipeline import interrupts

    interrupts.reset()
    mangled = RuntimeError("pybind11::error_already_set: MISMATCH of original and normalized "
                           "active exception types: ORIGINAL _NotOkStatusException REPLACED BY "
                           "Interrupted: SIGTERM")
    assert not interrupts.disguised(mangled)  # no signal yet: a real failure
    with interrupts.raised_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
        except interrupts.Interrupted:
            pass
    assert interrupts.disguised(mangled)
    # the LiteRT converter interrupted mid-trace leaves Keras half set up: what follows is noise
    assert interrupts.disguised(TypeError("'NoneType' object is not callable"))
    from pipeline.exitcodes import ConfigError
    from pipeline.storage import S3Unavailable  # the project's own errors keep their codes

    assert not interrupts.disguised(ConfigError("bad option"))
    assert not interrupts.disguised(S3Unavailable("S3 did not answer"))
    interrupts.reset()
