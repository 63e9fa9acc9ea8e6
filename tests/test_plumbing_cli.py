"""Odd plumbing through the real CLI: a closed stdout or a reader that has gone, configs and
manifests that are the wrong kind of thing, report and compact pointed at the wrong place."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import save_photo, skimage_photo


@pytest.fixture(scope="module")
def one_photo(tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    save_photo(skimage_photo("chelsea"), d / "cat.jpg", quality=85)
    return d


def manifests(out):
    return [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]


def test_json_summary_into_a_gone_reader_or_a_closed_stdout_keeps_the_run_s_exit_code(
        cli_env, one_photo, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "label", one_photo, out, "--json"],
                            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the summary is printed
    stderr = proc.stderr.read().decode()
    assert proc.wait(300) == 0, stderr
    [manifest] = manifests(out)
    assert manifest["summary"]["exit_code"] == 0
    assert (f"stdout was closed before the summary could be printed; it is in the run manifest, "
            f"OUTPUT/_runs/{manifest['summary']['run_id']}.json") in stderr
    closed = subprocess.run(
        ["sh", "-c", 'exec "$0" -m pipeline label "$1" "$2" --json >&-', sys.executable,
         one_photo, out], env=cli_env, capture_output=True, text=True, timeout=300)
    assert closed.returncode == 0, closed.stderr
    assert "Traceback" not in closed.stderr and "error" not in closed.stderr


def _parquet_manifest(column):
    def write(path):
        pq.write_table(pa.table({"path": column}), path)
    return write


def _fifo(path):
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR)  # a writer exists: opening it to read does not block
    os.write(fd, b"path\n/nowhere/cat.jpg\n")


# (file to make, its name, the command after it, the message of the exit-2 line)
USAGE_CASES = {
    "config_not_utf8": (lambda p: p.write_bytes(b'batch_size = "\xff"\n'), "bad.toml",
                        ["label", "in", "out", "--config", "{}"], "is not valid UTF-8 (byte 14)"),
    "config_a_directory": (lambda p: p.mkdir(), "configs", ["label", "in", "out", "--config", "{}"],
                           "config file {} is a directory"),
    "manifest_path_a_list": (_parquet_manifest(pa.array([["a.jpg"]])), "list.parquet",
                             ["label", "{}", "out"], "its path column must hold strings; it is list"),
    "manifest_path_a_struct": (_parquet_manifest(pa.array([{"a": "b.jpg"}])), "list.parquet",
                               ["label", "{}", "out"], "path column must hold strings; it is struct"),
    "csv_manifest_a_fifo": (_fifo, "list.csv", ["label", "{}", "out"],
                            "is not a regular file (a pipe?): a .csv or .parquet manifest is read "
                            "more than once"),
    "report_into_a_directory": (lambda p: p.mkdir(), "pages", ["report", ".", "-o", "{}"],
                                "-o {} is a directory; name the HTML file to write"),
    "compact_not_an_output": (lambda p: p.mkdir(), "photos", ["compact", "{}"],
                              "{} is not an OUTPUT of pipeline label"),
}


@pytest.mark.parametrize("case", USAGE_CASES)
def test_the_wrong_kind_of_file_is_exit_2_saying_what_it_is(cli, tmp_path, case):
    make, name, args, message = USAGE_CASES[case]
    path = tmp_path / name
    make(path)
    proc = cli(*[a.format(path) for a in args], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message.format(path) in proc.stderr
    assert "Traceback" not in proc.stderr and "_tmp-" not in proc.stderr
    assert not (tmp_path / "out").exists()
    if path.is_dir():
        assert os.listdir(path) == []  # compact took no lock in it


def test_a_keras_file_that_is_not_a_model_says_so(cli, tmp_path, one_photo):
    fake, labels = tmp_path / "model.keras", tmp_path / "labels.txt"
    fake.write_text("<html>not a model</html>")
    labels.write_text("cat\ndog\n")
    proc = cli("label", one_photo, tmp_path / "out", "--model", fake, "--labels", labels,
               "--preprocess", "tf")
    assert proc.returncode == 2, proc.stderr
    assert f"cannot load {fake} as a Keras model: it is not a .keras file (a zip archive)" \
        in proc.stderr
    assert "File not found" not in proc.stderr


def test_report_on_an_s3_output_that_does_not_exist_is_exit_2(cli_env, s3, tmp_path):
    env = {**cli_env, **s3.env}
    for output in (f"s3://{s3.bucket}/no-such-prefix", "s3://no-such-bucket-4d1f/out"):
        proc = subprocess.run([sys.executable, "-m", "pipeline", "report", output, "-o",
                               tmp_path / "r.html"], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"OUTPUT not found: there is no object under {output}" in proc.stderr
    assert not (tmp_path / "r.html").exists()
