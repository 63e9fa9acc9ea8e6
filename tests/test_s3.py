"""S3 end to end against a real S3-compatible server (moto_server): the CLI with s3:// INPUT and
OUTPUT, mixed local/S3, the lock object, and an outage longer than the retry budget."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import (CATS, ROOT, SKIMAGE_PHOTOS, read_s3_rows, read_summary, run_cli,
                      upload_dir)

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
    images = [k for k in uploaded if not k.endswith(".txt")] + ["broken/empty.jpg"]
    env = env_with(cli_env, s3)
    out = f"s3://{s3.bucket}/labels/"

    proc = run_cli(["label", f"s3://{s3.bucket}/in/", out, "--json", "--max-error-rate", "0.5"], env)
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(proc)
    assert (summary["labeled"], summary["errors"], summary["ignored_files"]) == (5, 1, 1)

    rows = read_s3_rows(s3.fs, out)
    check_photo_rows(rows, images, f"s3://{s3.bucket}/in/")
    empty = rows[rows.image_id == "broken/empty.jpg"].iloc[0]
    assert (empty.status, empty.error_kind, empty.file_size) == ("error", "empty_file", 0)
    size = s3.client.head_object(Bucket=s3.bucket, Key="in/chelsea.jpg")["ContentLength"]
    assert rows[rows.image_id == "chelsea.jpg"].file_size.item() == size
    objects = keys(s3, "labels/")
    assert "labels/_lock" not in objects  # released
    assert len([k for k in objects if k.startswith("labels/_runs/")]) == 1

    again = run_cli(["label", f"s3://{s3.bucket}/in/", out, "--json"], env)
    assert again.returncode == 0, again.stderr
    assert (read_summary(again)["skipped"], read_summary(again)["labeled"]) == (6, 0)
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
    time.sleep(2.5)
    proc = run_cli(["label", f"s3://{s3.bucket}/in/", f"s3://{s3.bucket}/out/", "--json",
                    "--s3-lock-lease", "2"], env)
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
