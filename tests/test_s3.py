"""S3 end to end against a real S3-compatible server (moto_server): the CLI with s3:// INPUT and
OUTPUT, mixed local/S3, the lock object, and an outage longer than the retry budget."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import formatfiles
from conftest import (CATS, ROOT, SKIMAGE_PHOTOS, read_s3_rows, read_summary, run_cli,
                      skimage_photo, upload_dir, wait_until_s3_age)

FAST_RETRIES = ["--s3-max-attempts", "2", "--s3-connect-timeout", "1", "--s3-request-timeout", "2"]


def env_with(cli_env, s3, endpoint_var=True):
    env = {**cli_env, **s3.env}
    if not endpoint_var:
        env.pop("AWS_ENDPOINT_URL")
    return env


def keys(s3, prefix):
    listing = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def check_photo_rows(rows, expected_ids, uri_prefix):
    assert sorted(rows.image_id) == sorted(expected_ids)  # every image, exactly once
    for row in rows.itertuples():
        assert row.uri == uri_prefix + row.image_id
        name = os.path.splitext(os.path.basename(row.image_id))[0]
        if name in SKIMAGE_PHOTOS:
            assert row.status == "ok" and row.width > 0 and row.height > 0
            wanted = SKIMAGE_PHOTOS[name]
            if wanted:
                assert wanted & set(row.label_ids), (row.image_id, list(row.label_ids))


def test_s3_input_to_s3_output_every_row_then_resume(s3, photos_dir, cli_env):
    uploaded = upload_dir(s3.client, s3.bucket, photos_dir, "in")
    s3.client.put_object(Bucket=s3.bucket, Key="in/broken/empty.jpg", Body=b"")
    heic = formatfiles.heic(skimage_photo("chelsea"))
    s3.client.put_object(Bucket=s3.bucket, Key="in/phone/chelsea.heic", Body=heic)  # Pillow's decoder
    images = [k for k in uploaded if not k.endswith(".txt")] + ["broken/empty.jpg", "phone/chelsea.heic"]
    env = env_with(cli_env, s3)
    out = f"s3://{s3.bucket}/labels/"

    proc = run_cli(["label", f"s3://{s3.bucket}/in/", out, "--json", "--max-error-rate", "0.5"], env)
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(proc)
    assert (summary["labeled"], summary["errors"], summary["ignored_files"]) == (6, 1, 1)

    rows = read_s3_rows(s3.fs, out)
    check_photo_rows(rows, images, f"s3://{s3.bucket}/in/")
    empty = rows[rows.image_id == "broken/empty.jpg"].iloc[0]
    assert (empty.status, empty.error_kind, empty.file_size) == ("error", "empty_file", 0)
    assert rows[rows.image_id == "broken/empty.jpg"].content_sha256.isna().all()  # nothing read
    for row in rows[rows.status == "ok"].itertuples():  # hashed from the bytes the GET returned
        local = heic if row.image_id.endswith(".heic") else (photos_dir / row.image_id).read_bytes()
        assert row.content_sha256 == hashlib.sha256(local).hexdigest(), row.image_id
    size = s3.client.head_object(Bucket=s3.bucket, Key="in/chelsea.jpg")["ContentLength"]
    assert rows[rows.image_id == "chelsea.jpg"].file_size.item() == size
    objects = keys(s3, "labels/")
    assert "labels/_lock" not in objects  # released
    assert len([k for k in objects if k.startswith("labels/_runs/")]) == 1

    again = run_cli(["label", f"s3://{s3.bucket}/in/", out, "--json"], env)
    assert again.returncode == 0, again.stderr
    assert (read_summary(again)["skipped"], read_summary(again)["labeled"]) == (7, 0)
    assert len(read_s3_rows(s3.fs, out)) == len(images)


def test_local_input_to_s3_output_with_endpoint_flag(s3, photos_dir, cli_env):
    env = env_with(cli_env, s3, endpoint_var=False)  # the flag alone names the endpoint
    out = f"s3://{s3.bucket}/out"
    proc = run_cli(["label", photos_dir, out, "--s3-endpoint", s3.server.endpoint, "--json"], env)
    assert proc.returncode == 0, proc.stderr
    rows = read_s3_rows(s3.fs, out)
    ids = [p.relative_to(photos_dir).as_posix() for p in photos_dir.rglob("*")
           if p.is_file() and p.suffix != ".txt"]
    check_photo_rows(rows, ids, str(photos_dir) + "/")


def test_s3_input_to_local_output_prefix_and_manifest(s3, photos_dir, cli_env, tmp_path):
    import pandas as pd

    uploaded = [k for k in upload_dir(s3.client, s3.bucket, photos_dir, "data/in")
                if not k.endswith(".txt")]
    env = env_with(cli_env, s3)
    out = tmp_path / "labels"
    proc = run_cli(["label", f"s3://{s3.bucket}/data/in", out, "--json"], env)
    assert proc.returncode == 0, proc.stderr
    check_photo_rows(pd.read_parquet(out), uploaded, f"s3://{s3.bucket}/data/in/")

    manifest = tmp_path / "list.txt"
    manifest.write_text(f"s3://{s3.bucket}/data/in/chelsea.jpg\ns3://{s3.bucket}/data/in/gone.jpg\n")
    proc = run_cli(["label", manifest, tmp_path / "m", "--json", "--max-error-rate", "1"], env)
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_parquet(tmp_path / "m").set_index("image_id")
    assert rows.loc[f"s3://{s3.bucket}/data/in/chelsea.jpg", "label_id"] in CATS
    assert rows.loc[f"s3://{s3.bucket}/data/in/gone.jpg", "error_kind"] == "not_found"


def test_lock_object_refuses_a_second_run_and_a_stale_one_is_taken_over(s3, photos_dir, cli_env):
    upload_dir(s3.client, s3.bucket, photos_dir / "png", "in")
    env = env_with(cli_env, s3)
    live = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    s3.client.put_object(Bucket=s3.bucket, Key="out/_lock", Body=json.dumps(live).encode())
    proc = run_cli(["label", f"s3://{s3.bucket}/in/", f"s3://{s3.bucket}/out/"], env)
    assert proc.returncode == 3, proc.stderr
    assert f"locked by pid {os.getpid()} on host {socket.gethostname()}" in proc.stderr
    assert keys(s3, "out/") == ["out/_lock"]  # nothing written

    # a holder on another host that stopped refreshing: stale once the lease ran out
    elsewhere = {**live, "host": "some-other-host"}
    s3.client.put_object(Bucket=s3.bucket, Key="out/_lock", Body=json.dumps(elsewhere).encode())
    wait_until_s3_age(s3.client, s3.bucket, "out/_lock", older_than=1)
    proc = run_cli(["label", f"s3://{s3.bucket}/in/", f"s3://{s3.bucket}/out/", "--json",
                    "--s3-lock-lease", "1"], env)
    assert proc.returncode == 0, proc.stderr
    assert read_summary(proc)["labeled"] == 2
    assert "out/_lock" not in keys(s3, "out/")


def test_outage_longer_than_retry_budget_ends_clearly_and_rerun_finds_every_image_once(
        s3, replicas, cli_env):
    src = replicas(1)  # ~20 real photos
    ids = upload_dir(s3.client, s3.bucket, src, "in")
    env = env_with(cli_env, s3)
    args = ["label", f"s3://{s3.bucket}/in/", f"s3://{s3.bucket}/out/", "--batch-size", "2",
            "--part-size", "2", "--progress", "none", *FAST_RETRIES]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = s3.server.proc
    try:
        deadline = time.monotonic() + 240
        while not any("/part-" in k for k in keys(s3, "out/")):  # mid-run: a part is committed
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no part was written"
            time.sleep(0.1)
        server.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        outage = time.monotonic() - stopped
    finally:
        server.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, stderr
    assert "S3" in stderr and "run the same command again" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    print(f"outage detected and run ended {outage:.1f}s after SIGSTOP")

    # nothing half-written: every part object is a complete Parquet file
    done_before = read_s3_rows(s3.fs, f"s3://{s3.bucket}/out/")
    assert 0 < len(done_before) < len(ids)

    again = run_cli(args[:3] + ["--json", *FAST_RETRIES], env)
    assert again.returncode == 0, again.stderr
    rows = read_s3_rows(s3.fs, f"s3://{s3.bucket}/out/")
    assert sorted(rows.image_id) == sorted(ids)  # every image exactly once
    assert set(rows.status) == {"ok"}
    assert read_summary(again)["skipped"] >= len(done_before)


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over_at_once(s3, photos_dir, cli_env):
    """README: a lock is stale at once when its holder ran on this host and that pid is gone
    (a killed nightly job must not block the next one for the whole lease)."""
    upload_dir(s3.client, s3.bucket, photos_dir / "png", "in")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is now free
    holder = {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
              "command": "label", "lease_seconds": 600}
    s3.client.put_object(Bucket=s3.bucket, Key="out/_lock", Body=json.dumps(holder).encode())
    proc = run_cli(["label", f"s3://{s3.bucket}/in/", f"s3://{s3.bucket}/out/", "--json"],
                   env_with(cli_env, s3))  # default lease 600 s: only the dead pid makes it stale
    assert proc.returncode == 0, proc.stderr
    assert read_summary(proc)["labeled"] == 2
    assert "out/_lock" not in keys(s3, "out/")


def test_a_run_that_lost_its_lease_while_paused_commits_nothing_and_exits_3(s3, replicas, cli_env,
                                                                          tmp_path):
    """Fencing: run A holds the lock and has built its done set, and is paused (SIGSTOP) past
    its lease while run B takes the lock over and labels everything. Continued, A labels its
    (stale) pending images but must not commit a part: every commit first renews the lease with
    a conditional write, which fails. A ends with exit 3 and says why."""
    ids = upload_dir(s3.client, s3.bucket, replicas(1), "in")
    env = env_with(cli_env, s3)
    args = ["label", f"s3://{s3.bucket}/in/", f"s3://{s3.bucket}/out/", "--batch-size", "2",
            "--part-size", "2", "--s3-lock-lease", "2", "--progress", "none", "--json"]
    log = tmp_path / "a.log"
    # A's own model cache: it converts the weights after its done set is built, and says so
    env_a = {**env, "XDG_CACHE_HOME": str(tmp_path / "cache-a")}
    with open(log, "w") as sink:  # a file: a full pipe would block the child
        a = subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env_a,
                             stdout=sink, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: "converting" in log.read_text() or a.poll() is not None, 240)
        a.send_signal(signal.SIGSTOP)  # holding the lock, its done set (empty) built
        assert a.poll() is None, log.read_text()
        assert "out/_lock" in keys(s3, "out/")
        assert not [k for k in keys(s3, "out/") if "/part-" in k], "A committed before the pause"
        assert wait_for(lambda: time.time() - lock_modified(s3, "out/_lock") > 3, 30)  # stale

        b = run_cli(args, env)  # takes the stale lock over and labels everything
        assert b.returncode == 0, b.stderr
        assert "took over the stale lock" in b.stderr
        assert (read_summary(b)["labeled"], read_summary(b)["skipped"]) == (len(ids), 0)
    finally:
        a.send_signal(signal.SIGCONT)
    assert a.wait(timeout=300) == 3, log.read_text()
    said = log.read_text()
    assert "lost the output lock" in said and "another run took it over" in said, said
    assert "Traceback" not in said, said
    parts = [k for k in keys(s3, "out/") if "/part-" in k]
    assert parts and all(read_summary(b)["run_id"] in k for k in parts)  # nothing of A's
    rows = read_s3_rows(s3.fs, f"s3://{s3.bucket}/out/")
    assert sorted(rows.image_id) == sorted(ids)  # every image exactly once
    assert "out/_lock" not in keys(s3, "out/")  # B released it; A did not touch it after
    (mine,) = [k for k in keys(s3, "out/_runs/") if k.endswith(".json")
               and read_summary(b)["run_id"] not in k]
    summary = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=mine)["Body"].read())["summary"]
    assert summary["labeled"] > 0 and summary["parts_written"] == 0  # it tried to commit
    assert summary["exit_code"] == 3


def wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def lock_modified(s3, key):
    return s3.client.head_object(Bucket=s3.bucket, Key=key)["LastModified"].timestamp()


def test_overwrite_on_s3_relabels_everything_and_deletes_the_old_parts(s3, photos_dir, cli_env):
    upload_dir(s3.client, s3.bucket, photos_dir, "in")
    env = env_with(cli_env, s3)
    args = ["label", f"s3://{s3.bucket}/in/", f"s3://{s3.bucket}/out/", "--json", "--part-size", "2"]
    first = run_cli(args, env)
    assert first.returncode == 0, first.stderr
    old_parts = [k for k in keys(s3, "out/") if k.startswith("out/part-")]
    assert len(old_parts) == 3  # 5 photos in parts of 2

    proc = run_cli([*args, "--overwrite"], env)
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(proc)
    assert (summary["labeled"], summary["skipped"], summary["parts_replaced"]) == (5, 0, 3)
    objects = keys(s3, "out/")
    assert not set(old_parts) & set(objects)  # the old parts are gone
    assert not [k for k in objects if "_overwrite-" in k or k == "out/_lock"]
    rows = read_s3_rows(s3.fs, f"s3://{s3.bucket}/out/")
    assert sorted(rows.image_id) == sorted(p.relative_to(photos_dir).as_posix()
                                           for p in photos_dir.rglob("*") if p.suffix != ".txt"
                                           and p.is_file())
    assert set(rows.run_id) == {summary["run_id"]} and set(rows.status) == {"ok"}


class FlakyS3Proxy:
    """An HTTP proxy on 127.0.0.1 in front of moto_server that answers the first attempt of
    every distinct request (method + path + query) with 503 SlowDown, without forwarding it;
    the retry goes through. Counts what it refused, by method."""

    def __init__(self, upstream: str):
        import collections
        import http.client
        import http.server
        import threading

        host, port = upstream.split("://")[1].split(":")
        seen, refused, lock = set(), collections.Counter(), threading.Lock()
        self.refused = refused

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                key = (self.command, self.path)
                with lock:
                    first = key not in seen
                    seen.add(key)
                    if first:
                        refused[self.command] += 1
                if first:
                    error = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                             b"<Message>injected by the test</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(error)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(error)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "content-length", "expect")}
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                conn.request(self.command, self.path, body=body if body or self.command in
                             ("PUT", "POST") else None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                         "date", "server"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_s3_errors_are_retried_and_the_run_succeeds(s3, photos_dir, cli_env):
    """README: every S3 request is retried with backoff on 5xx and throttling. Every request
    (listing, object reads, the lock, part uploads) first gets a 503; the run must still label
    every image once, with nothing but the retries to help it."""
    uploaded = [k for k in upload_dir(s3.client, s3.bucket, photos_dir, "in") if not k.endswith(".txt")]
    proxy = FlakyS3Proxy(s3.server.endpoint)
    try:
        env = env_with(cli_env, s3, endpoint_var=False)
        proc = run_cli(["label", f"s3://{s3.bucket}/in/", f"s3://{s3.bucket}/out/", "--json",
                        "--part-size", "2", "--s3-endpoint", proxy.endpoint], env)
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stderr
    assert read_summary(proc)["labeled"] == 5
    assert proxy.refused["GET"] >= 5 and proxy.refused["PUT"] >= 3, proxy.refused  # reads, parts
    rows = read_s3_rows(s3.fs, f"s3://{s3.bucket}/out/")
    check_photo_rows(rows, uploaded, f"s3://{s3.bucket}/in/")


def test_s3_prefix_skips_hidden_keys_and_counts_them(s3, photos_dir, cli_env, tmp_path):
    photo = (photos_dir / "chelsea.jpg").read_bytes()
    for key in ["in/chelsea.jpg", "in/.hidden.jpg", "in/.thumbnails/t.jpg", "in/sub/.x/y.jpg",
                "in/notes.txt"]:
        s3.client.put_object(Bucket=s3.bucket, Key=key, Body=photo)
    proc = run_cli(["label", f"s3://{s3.bucket}/in/", tmp_path / "out", "--json"],
                   env_with(cli_env, s3))
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(proc)
    assert (summary["labeled"], summary["ignored_files"]) == (1, 4)


def test_keys_with_empty_segments_are_labeled_from_a_listing_and_a_manifest(s3, photos_dir,
                                                                            cli_env, tmp_path):
    """`a//b.jpg` and `/lead.jpg` are legal S3 keys that pyarrow's S3FileSystem refuses ("Empty
    path component"): they are read by their raw key, never an `unreadable` row or the run's end."""
    import pandas as pd

    photo = (photos_dir / "chelsea.jpg").read_bytes()
    odd = ["odd//twice.jpg", "odd/x///three.jpg"]
    for key in odd:
        s3.client.put_object(Bucket=s3.bucket, Key=key, Body=photo)
    env = env_with(cli_env, s3)
    proc = run_cli(["label", f"s3://{s3.bucket}/odd/", tmp_path / "listed", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_parquet(tmp_path / "listed")
    assert sorted(rows.uri) == sorted(f"s3://{s3.bucket}/{k}" for k in odd)
    assert (rows.status == "ok").all() and rows.label_id.isin(CATS).all(), rows

    s3.client.put_object(Bucket=s3.bucket, Key="/lead.jpg", Body=photo)
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"s3://{s3.bucket}/odd//twice.jpg\ns3://{s3.bucket}//lead.jpg\n"
                        f"s3://{s3.bucket}/odd//gone.jpg\n")
    proc = run_cli(["label", manifest, tmp_path / "m", "--json", "--max-error-rate", "1"], env)
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_parquet(tmp_path / "m").set_index("image_id")
    assert rows.loc[f"s3://{s3.bucket}/odd//twice.jpg", "label_id"] in CATS
    assert rows.loc[f"s3://{s3.bucket}//lead.jpg", "label_id"] in CATS
    assert rows.loc[f"s3://{s3.bucket}/odd//gone.jpg", "error_kind"] == "not_found"


@pytest.mark.parametrize("command", ["label", "compact", "report"])
def test_an_output_prefix_with_an_empty_segment_is_a_usage_error(command, s3, photos_dir, cli_env,
                                                                 tmp_path):
    """Parts are written and read through pyarrow's S3 filesystem, which refuses `a//b` keys:
    such an OUTPUT is refused up front (exit 2, naming the '//'), before anything is written."""
    output = f"s3://{s3.bucket}/labels//night/"
    args = {"label": ["label", photos_dir, output],
            "compact": ["compact", output],
            "report": ["report", output, "-o", tmp_path / "report.html"]}[command]
    proc = run_cli(args, env_with(cli_env, s3))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "'//'" in proc.stderr and output in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert s3.client.list_objects_v2(Bucket=s3.bucket).get("KeyCount", 0) == 0
    assert not (tmp_path / "report.html").exists()
