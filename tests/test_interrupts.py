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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_raises_interrupted_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted, match=signal.Signals(sig).name):
        with interrupts.raised_on_signals():
            os.kill(os.getpid(), sig)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
    assert interrupts.requested()
    assert signal.getsignal(sig) is before


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
