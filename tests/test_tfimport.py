"""tfimport's muting of fds 1 and 2 (native code's chatter), seen from a child process."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _child(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=60)


def test_muted_text_is_dropped_and_the_fds_come_back():
    done = _child("""
        import os
        from pipeline.tfimport import muted_output
        with muted_output(stdout=True):
            os.write(1, b"chatter-out "); os.write(2, b"chatter-err ")
        os.write(1, b"after-out"); os.write(2, b"after-err")
    """)
    assert (done.stdout, done.stderr) == ("after-out", "after-err")


def test_a_failure_inside_shows_what_was_muted():
    done = _child("""
        import os
        from pipeline.tfimport import muted_output
        try:
            with muted_output():
                os.write(2, b"converter said why. ")
                raise ValueError("boom")
        except ValueError:
            pass
    """)
    assert "converter said why." in done.stderr


def test_unmute_for_exit_is_heard_while_nested_mutes_are_active():
    """The signal watchdog ends the process from inside a mute (the LiteRT converter stuck):
    its summary and message reach the real stdout and stderr, not the capture file."""
    done = _child("""
        import os
        from pipeline.tfimport import muted_output, unmute_for_exit
        with muted_output(stdout=True), muted_output():
            unmute_for_exit()
            print('{"exit_code": 130}', flush=True)
            os.write(2, b"error: interrupted")
            os._exit(130)
    """)
    assert done.returncode == 130
    assert (done.stdout, done.stderr) == ('{"exit_code": 130}\n', "error: interrupted")
