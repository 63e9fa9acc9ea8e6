"""End to end: the real CLI in a subprocess, on real photos, read back as a user would."""
import datetime as dt
import json
import os
import subprocess
import textwrap

import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import sample_accuracy  # scripts/sample_accuracy.py (conftest puts scripts/ on sys.path)
from conftest import SKIMAGE_PHOTOS, read_summary


@pytest.fixture(scope="module")
def labeled(cli, photos_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "labels"
    started = dt.datetime.now(dt.timezone.utc)
    proc = cli("label", photos_dir, out, "--json", "--top-k", "5")
    assert proc.returncode == 0, proc.stderr
    return out, read_summary(proc), started


def test_summary_counts(labeled):
    _, summary, _ = labeled
    assert summary["labeled"] == 5 and summary["errors"] == 0
    assert summary["ignored_files"] == 1  # notes.txt
    assert summary["exit_code"] == 0 and summary["parts_written"] == 1


def test_every_column_of_every_row(labeled, photos_dir):
    out, summary, started = labeled
    df = pd.read_parquet(out)
    assert sorted(df.image_id) == ["astronaut.jpg", "chelsea.jpg", "motorcycle.jpg",
                                   "png/coffee.PNG", "png/rocket.PNG"]
    for row in df.itertuples():
        path = photos_dir / row.image_id
        assert row.uri == str(path)
        assert row.status == "ok" and pd.isna(row.error) and pd.isna(row.error_kind)
        assert row.file_size == path.stat().st_size
        assert abs(row.mtime.timestamp() - path.stat().st_mtime) < 1e-3
        assert len(row.label_ids) == len(row.labels) == len(row.scores) == 5
        assert row.label_id == row.label_ids[0] and row.label == row.labels[0]
        assert row.score == pytest.approx(row.scores[0])
        assert list(row.scores) == sorted(row.scores, reverse=True) and 0 < row.score <= 1
        assert all(i.startswith("n") and len(i) == 9 for i in row.label_ids)
        assert row.model == "efficientnet_lite0" and row.run_id == summary["run_id"]
        assert started <= row.labeled_at.to_pydatetime() <= dt.datetime.now(dt.timezone.utc)
    sizes = {r.image_id.split("/")[-1].split(".")[0]: (r.width, r.height) for r in df.itertuples()}
    assert sizes["chelsea"] == (451, 300) and sizes["coffee"] == (600, 400)


def test_photos_get_their_classes(labeled):
    df = pd.read_parquet(labeled[0])
    for row in df.itertuples():
        expected = SKIMAGE_PHOTOS[row.image_id.split("/")[-1].split(".")[0]]
        if expected:
            assert expected & set(row.label_ids), (row.image_id, list(row.labels))


def test_schema_and_file_metadata(labeled):
    out = labeled[0]
    part = next(out.glob("part-*.parquet"))
    schema = pq.read_schema(part)
    assert schema.field("label_ids").type.value_type == "string"
    assert schema.field("scores").type.value_type == "float"
    assert str(schema.field("labeled_at").type) == "timestamp[us, tz=UTC]"
    assert str(schema.field("width").type) == "int32"
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta["pipeline.model"] == "efficientnet_lite0"
    assert len(meta["pipeline.weights_sha256"]) == 64
    assert json.loads(meta["pipeline.preprocessing"])["crop_fraction"] == 0.875
    assert meta["pipeline.top_k"] == "5" and meta["pipeline.version"]


def test_reads_back_with_pyarrow_dataset_and_duckdb(labeled):
    duckdb = pytest.importorskip("duckdb")
    out = labeled[0]
    assert pads.dataset(out, format="parquet").count_rows() == 5
    rows = duckdb.sql(f"SELECT label, count(*) FROM '{out}/*.parquet' GROUP BY 1 ORDER BY 2 DESC").fetchall()
    assert sum(n for _, n in rows) == 5
    cats = duckdb.sql(f"""SELECT image_id FROM '{out}/*.parquet'
                          WHERE list_contains(label_ids, 'n02123159') OR label LIKE '%cat%'""").fetchall()
    assert ("chelsea.jpg",) in cats


def test_run_manifest(labeled):
    out, summary, _ = labeled
    manifest = json.loads((out / "_runs" / f"{summary['run_id']}.json").read_text())
    assert manifest["summary"]["labeled"] == 5
    assert manifest["config"]["model"] == "efficientnet_lite0"
    assert manifest["versions"]["tensorflow"] and manifest["model"]["weights_sha256"]
    t = manifest["timings"]  # the run's steps in the order they happen, within its wall time
    steps = [t["done_set_seconds"], t["first_pending_seconds"], t["first_result_seconds"],
             t["last_result_seconds"], manifest["summary"]["wall_seconds"]]
    assert steps == sorted(steps) and steps[0] > 0, t


def test_second_run_labels_nothing_and_says_so(cli, labeled, photos_dir):
    out = labeled[0]
    proc = cli("label", photos_dir, out)
    assert proc.returncode == 0, proc.stderr
    assert "nothing new to label" in proc.stderr
    assert len(pd.read_parquet(out)) == 5


def test_accuracy_on_the_shared_imagenet_sample(cli, shared_images, tmp_path):
    proc = cli("label", shared_images, tmp_path / "out", "--json", "--batch-size", "50")
    assert proc.returncode == 0, proc.stderr
    a = sample_accuracy.accuracy(tmp_path / "out")
    assert a["images"] == a["ok"] == 100
    print(f"imagenet-sample-100: top-1 {a['top1']:.2f}, top-5 {a['top5']:.2f}")
    assert a["top1"] >= 0.86 and a["top5"] >= 0.96


SOCKET_BLOCKER = textwrap.dedent('''
    import socket
    def _refuse(*args, **kwargs):
        open(__import__("os").environ["NETLOG"], "a").write(repr(args[:2]) + "\\n")
        raise OSError("network disabled by test")
    socket.socket.connect = _refuse
    socket.socket.connect_ex = _refuse
    socket.create_connection = _refuse
    socket.getaddrinfo = _refuse
''')


def no_network_env(cli_env, tmp_path, **extra):
    """cli_env with SOCKET_BLOCKER loaded at interpreter start (sitecustomize on PYTHONPATH);
    every connection attempt is appended to tmp_path/net.log."""
    (tmp_path / "site").mkdir(parents=True, exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(SOCKET_BLOCKER)
    return dict(cli_env, PYTHONPATH=f"{tmp_path / 'site'}:{cli_env['PYTHONPATH']}",
                NETLOG=str(tmp_path / "net.log"), **extra)


def test_no_network_is_touched(cli_env, photos_dir, tmp_path):
    from conftest import run_cli

    env = no_network_env(cli_env, tmp_path, XDG_CACHE_HOME=str(tmp_path / "fresh-cache"))
    proc = run_cli(["label", photos_dir, tmp_path / "out"], env)  # fresh cache: converts too
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "net.log").exists(), (tmp_path / "net.log").read_text()
    assert len(pd.read_parquet(tmp_path / "out")) == 5


class _Listener:
    """A TCP server on 127.0.0.1 that counts the connections it accepts (and closes them)."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port, self.accepted = self.sock.getsockname()[1], 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self):
        self.sock.close()


def test_the_socket_blocker_stops_a_real_connection_of_the_cli(cli_env, photos_dir, tmp_path):
    """Positive control for the no-network tests: the same environment, on a command that does
    connect (an S3 OUTPUT on a local endpoint), must have its connection refused and logged.
    Without the blocker the same command reaches the server, so the control can fail."""
    from conftest import run_cli

    listener = _Listener()
    try:
        args = ["label", photos_dir, "s3://bucket/out/", "--s3-endpoint",
                f"http://127.0.0.1:{listener.port}", "--s3-max-attempts", "1",
                "--s3-connect-timeout", "2", "--s3-request-timeout", "2"]
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        blocked = run_cli(args, no_network_env(dict(cli_env, **creds), tmp_path / "blocked"))
        assert blocked.returncode == 4, blocked.stderr
        assert listener.accepted == 0
        assert str(listener.port) in (tmp_path / "blocked" / "net.log").read_text()
        open_net = run_cli(args, dict(cli_env, **creds))
        assert open_net.returncode == 4, open_net.stderr
        assert listener.accepted >= 1  # the command really connects when nothing blocks it
    finally:
        listener.close()


def test_error_rate_decides_the_exit_code(cli, photos_dir, tmp_path):
    import shutil

    shutil.copytree(photos_dir, tmp_path / "in")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    proc = cli("label", tmp_path / "in", tmp_path / "out", "--json")
    assert proc.returncode == 1  # 1 of 6 failed > 5%
    summary = read_summary(proc)
    assert summary["errors_by_kind"] == {"corrupt": 1}
    row = pd.read_parquet(tmp_path / "out").set_index("image_id").loc["broken.jpg"]
    assert row.status == "error" and row.error_kind == "corrupt" and row.error
    proc = cli("label", tmp_path / "in", tmp_path / "out2", "--max-error-rate", "0.2")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args, message", [
    (["label", "{missing}", "{out}"], "input not found"),
    (["label", "{photos}", "{out}", "--config", "{badcfg}"], "unknown config key"),
    (["label", "{photos}", "{out}", "--model", "nope"], "unknown model"),
    (["label", "{photos}", "{out}", "--batch-size", "0"], "batch_size"),
])
def test_usage_errors_exit_2_with_a_message(cli, photos_dir, tmp_path, args, message):
    (tmp_path / "bad.toml").write_text("batchsize = 3\n")
    values = {"missing": tmp_path / "nope", "out": tmp_path / "out", "photos": photos_dir,
              "badcfg": tmp_path / "bad.toml"}
    proc = cli(*[a.format(**values) for a in args])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_models_command_lists_the_embedded_default(cli):
    proc = cli("models")
    assert proc.returncode == 0, proc.stderr
    line = next(s for s in proc.stdout.splitlines() if s.startswith("efficientnet_lite0"))
    assert "224" in line and "embedded" in line


def test_help_documents_exit_codes(cli):
    proc = cli("label", "--help")
    assert proc.returncode == 0
    assert "Exit codes" in proc.stdout and "130" in proc.stdout


PROGRESS_LOG_LINE = r"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+ images \(\d+ labeled, \d+ errors\) in "


def _label_on_a_terminal(cli_env, args) -> str:
    """Run the CLI with stdout and stderr on a pseudo-terminal (as in an interactive shell);
    everything it printed there."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0x0
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], env=cli_env,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(300) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_progress_is_a_bar_on_a_terminal_and_log_lines_in_a_pipe(cli_env, photos_dir, tmp_path):
    """README: a tqdm bar on a terminal; otherwise a plain log line (every 30 s, here every
    batch through the config); a summary line in both cases. Same command, only the stream
    differs (progress = "auto", the default)."""
    import re

    from conftest import run_cli

    (tmp_path / "fast.toml").write_text("log_interval = 0.0\nbatch_size = 2\n")
    args = ["label", photos_dir, None, "--config", tmp_path / "fast.toml"]
    on_tty = _label_on_a_terminal(cli_env, [*args[:2], tmp_path / "tty", *args[3:]])
    assert re.search(r"\d+img \[\d\d:\d\d", on_tty), on_tty  # tqdm: "5img [00:03, 1.52img/s"
    assert "\r" in on_tty and not re.search(PROGRESS_LOG_LINE, on_tty), on_tty
    assert "labeled 5, errors 0" in on_tty

    piped = run_cli([*args[:2], tmp_path / "pipe", *args[3:]], cli_env)
    assert piped.returncode == 0, piped.stderr
    assert len(re.findall(PROGRESS_LOG_LINE, piped.stderr)) >= 2, piped.stderr  # one per batch
    assert "img/s" not in piped.stderr and "\r" not in piped.stderr, piped.stderr
    assert "labeled 5, errors 0" in piped.stderr


def test_models_cache_dir_is_where_it_looks_for_converted_weights(cli, photos_dir, tmp_path):
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a writer killed mid-conversion left its temp file; this one is still writing:
    stale = cache / "models" / f"_tmp-x.weights.h5-{gone.pid}.weights.h5"
    live = cache / "models" / f"_tmp-y.tflite-{os.getpid()}.tmp"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    proc = cli("label", photos_dir, tmp_path / "out", "--runtime", "keras", "--cache-dir", cache)
    assert proc.returncode == 0, proc.stderr  # converted the embedded weights into `cache`
    assert not stale.exists() and live.exists()
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("")
    proc = cli("label", photos_dir / "chelsea.jpg", tmp_path / "out2", "--runtime", "keras",
               "--cache-dir", a_file)
    assert proc.returncode == 0, proc.stderr
    assert f"cannot cache {a_file}/models/efficientnet_lite0-" in proc.stderr
    assert "(Not a directory); the next run does this work again" in proc.stderr

    def lite0(cache_dir):
        proc = cli("models", "--cache-dir", cache_dir)
        assert proc.returncode == 0, proc.stderr
        return next(s for s in proc.stdout.splitlines() if s.startswith("efficientnet_lite0"))

    assert lite0(cache).endswith("embedded, converted")
    assert lite0(tmp_path / "elsewhere").endswith("embedded")
