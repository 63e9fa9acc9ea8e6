"""The in-process engine through the real CLI: a write failure on the writer thread ends the run."""
import resource

from conftest import run_cli


def limit_file_size():
    # The kernel refuses writes past 4 KiB (EFBIG): a part fails, the small run manifest fits.
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))


def test_a_failing_part_write_exits_4_with_the_reason_and_leaves_no_part(cli, cli_env, photos_dir, tmp_path):
    warm = cli("label", photos_dir, tmp_path / "warm")  # model caches exist before the limit applies
    assert warm.returncode == 0, warm.stderr
    out = tmp_path / "out"
    proc = run_cli(["label", photos_dir, out], cli_env, preexec_fn=limit_file_size)
    assert proc.returncode == 4, proc.stderr
    assert "File too large" in proc.stderr
    assert [p.name for p in out.iterdir() if not p.name.startswith(("_lock", "_runs"))] == []
