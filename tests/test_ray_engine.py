"""--engine ray on a real local Ray cluster: same rows as the local engine; a killed actor loses
and duplicates nothing. Each run starts its own cluster from the CLI (ray.init on this machine)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pandas as pd
import pytest

from conftest import SKIMAGE_PHOTOS, read_summary, save_photo, skimage_photo
from test_crash import wait_for_part

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install '.[ray]')")

ACTOR_TITLE = "ray::MapWorker(MapBatches(Labeler))"
SCORE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def two_hundred(tmp_path_factory) -> Path:
    """>= 200 distinct real photos as JPEGs (the shared sample twice, re-encoded at two sizes;
    without it, scikit-image photos cropped 40 ways each), a HEIC, an AVIF and a TIFF, plus two
    broken files."""
    from PIL import Image

    from conftest import SHARED_IMAGES

    d = tmp_path_factory.mktemp("two_hundred")
    if SHARED_IMAGES.is_dir():
        for p in sorted(SHARED_IMAGES.glob("*.JPEG")):
            img = Image.open(p).convert("RGB")
            img.save(d / f"{p.stem}-a.jpg", quality=90)
            img.resize((img.width * 3 // 4, img.height * 3 // 4)).save(d / f"{p.stem}-b.jpg", quality=85)
    else:
        for name in SKIMAGE_PHOTOS:
            a = skimage_photo(name)
            h, w = a.shape[:2]
            for i in range(40):
                top, left = (i * 7) % (h // 5), (i * 11) % (w // 5)
                save_photo(a[top: top + h * 4 // 5, left: left + w * 4 // 5], d / f"{name}-{i:02d}.jpg",
                           quality=88)
    import formatfiles  # and one each of the formats Pillow decodes, in the Ray decode tasks too

    cat = skimage_photo("chelsea")
    (d / "phone.heic").write_bytes(formatfiles.heic(cat))
    (d / "phone.avif").write_bytes(formatfiles.avif(cat))
    (d / "scan.tif").write_bytes(formatfiles.tiff(cat, "CMYK"))
    (d / "truncated.jpg").write_bytes((sorted(d.glob("*.jpg"))[0]).read_bytes()[:300])
    (d / "not-a-picture.png").write_bytes(b"this is text, not a PNG")
    return d


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
def test_model_actors_leave_cores_for_decoding(cpus):
    from pipeline.engines.ray import actor_plan

    plan = actor_plan({"CPU": float(cpus)})
    assert plan["actors"] >= 1 and plan["threads"] >= 1
    assert plan["actors"] * plan["num_cpus"] + plan["decode_cpus"] <= cpus  # ray#44687


def test_one_model_actor_per_gpu():
    from pipeline.engines.ray import actor_plan

    plan = actor_plan({"CPU": 8.0, "GPU": 2.0})
    assert (plan["actors"], plan["num_gpus"]) == (2, 1)


def test_ray_engine_without_ray_installed_is_a_usage_error(photos_dir, cli_env, tmp_path):
    code = "import sys; sys.modules['ray'] = None; from pipeline.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "label", str(photos_dir), str(tmp_path / "out"),
                           "--engine", "ray"], env=cli_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'pipeline[ray]'" in proc.stderr


def _labels(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output).set_index("image_id").sort_index()


@pytest.fixture(scope="module")
def local_rows(two_hundred, cli, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("local") / "out"
    proc = cli("label", two_hundred, out, "--runtime", "keras", "--json", "--progress", "none",
               timeout=600)
    assert proc.returncode == 0, proc.stderr
    return _labels(out)


def _ray_label(cli, input_dir: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return cli("label", input_dir, out, "--engine", "ray", "--runtime", "keras", "--json",
               "--progress", "none", *extra, timeout=900)


@needs_ray
def test_ray_engine_matches_local_engine(two_hundred, local_rows, cli, tmp_path):
    out = tmp_path / "out"
    proc = _ray_label(cli, two_hundred, out)
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(proc)
    assert summary["labeled"] >= 200 and summary["errors"] == 2
    feeds = {pq.read_schema(p).metadata[b"pipeline.feed"] for p in out.glob("part-*.parquet")}
    assert feeds == {b"uint8"}  # Keras: decode tasks shipped uint8 pixels, the actors normalized
    rows = _labels(out)
    assert list(rows.index) == list(local_rows.index)  # every input exactly once, same ids
    assert (rows.status == local_rows.status).all()
    assert (rows.error_kind.fillna("") == local_rows.error_kind.fillna("")).all()
    assert rows.content_sha256.notna().sum() >= 200  # every row that read bytes
    assert (rows.content_sha256.fillna("") == local_rows.content_sha256.fillna("")).all()
    ok = rows.status == "ok"
    assert (rows[ok][["width", "height"]] == local_rows[ok][["width", "height"]]).all().all()
    ray_scores = np.stack(rows[ok].scores.to_numpy())
    local_scores = np.stack(local_rows[ok].scores.to_numpy())
    worst = float(np.abs(ray_scores - local_scores).max())
    print(f"max |score difference| ray vs local over {ok.sum()} images: {worst:.2e}")
    assert worst < SCORE_TOLERANCE
    near_tie = local_scores[:, 0] - local_scores[:, 1] < SCORE_TOLERANCE
    same_top1 = rows[ok].label_id.to_numpy() == local_rows[ok].label_id.to_numpy()
    assert (same_top1 | near_tie).all()
    # a re-run skips everything: incremental skip works on Ray output too
    again = read_summary(_ray_label(cli, two_hundred, out))
    assert again["skipped"] == len(rows) and again["labeled"] == 0


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _actor_pids(root: int) -> list[int]:
    pids = []
    for pid in _descendants(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(ACTOR_TITLE):
            pids.append(pid)
    return pids


def _start_ray_run(input_dir: Path, out: Path, env: dict) -> subprocess.Popen:
    """`pipeline label --engine ray` in small parts, so a kill lands mid-run."""
    args = [sys.executable, "-m", "pipeline", "label", str(input_dir), str(out), "--engine", "ray",
            "--runtime", "keras", "--part-size", "16", "--batch-size", "8", "--json",
            "--progress", "none"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@needs_ray
def test_killed_ray_actor_is_restarted_and_the_run_loses_and_duplicates_nothing(
        two_hundred, local_rows, cli_env, tmp_path):
    """README: "A killed actor is restarted by Ray and its batch retried". No second run: the
    run whose actor was SIGKILLed must itself succeed with every image exactly once."""
    out = tmp_path / "out"
    proc = _start_ray_run(two_hundred, out, cli_env)
    assert wait_for_part(out, proc, timeout=600), "the run ended before it committed a part"
    actors = _actor_pids(proc.pid)  # mid-run: some rows are committed, the actor is working
    assert actors
    os.kill(actors[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["labeled"] == len(local_rows) - 2
    rows = pd.read_parquet(out)
    assert rows.image_id.is_unique  # nothing duplicated
    assert sorted(rows.image_id) == list(local_rows.index)  # nothing lost


@needs_ray
def test_sigterm_stops_the_ray_run_and_its_local_cluster(two_hundred, cli_env, tmp_path):
    out = tmp_path / "out"
    proc = _start_ray_run(two_hundred, out, cli_env)
    assert wait_for_part(out, proc, timeout=600), "the run ended before it committed a part"
    cluster = _descendants(proc.pid)  # raylet, GCS, agents, workers
    assert _actor_pids(proc.pid)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["exit_code"] == 130
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in cluster):
        time.sleep(0.5)
    left = [p for p in cluster if os.path.exists(f"/proc/{p}")]
    assert not left, f"Ray processes left behind: {left}"
    rows = pd.read_parquet(out)
    assert len(rows) >= 16 and rows.image_id.is_unique


@needs_ray
def test_a_run_with_nothing_new_starts_no_cluster(photos_dir, cli, cli_env, tmp_path):
    """README: "A run with nothing new to label starts no cluster at all". A Ray cluster started
    on this machine makes its session directory under $RAY_TMPDIR; none may appear."""
    import shutil
    import tempfile

    out = tmp_path / "out"
    first = cli("label", photos_dir, out, "--json", timeout=900)
    assert first.returncode == 0, first.stderr
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "label", str(photos_dir), str(out),
                               "--engine", "ray", "--json"], env=dict(cli_env, RAY_TMPDIR=str(ray_tmp)),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        summary = read_summary(proc)
        assert (summary["skipped"], summary["labeled"]) == (5, 0)
        assert summary["message"].startswith("nothing new to label")
        assert list(ray_tmp.iterdir()) == [], list(ray_tmp.rglob("*"))[:5]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@needs_ray
def test_ray_engine_reads_an_s3_input_named_by_the_endpoint_flag_alone(s3, photos_dir, cli_env,
                                                                       tmp_path):
    """--s3-endpoint must reach Ray's decode tasks too (it once reached only the driver: Ray
    read from AWS itself and the run died). No AWS_ENDPOINT_URL: the flag is the only way."""
    from conftest import run_cli
    from test_s3 import check_photo_rows, env_with

    photos = sorted(p for p in photos_dir.rglob("*") if p.is_file() and p.suffix != ".txt")
    ids = []
    for copy in range(4):  # 20 photos
        for p in photos:
            key = f"{copy}/{p.relative_to(photos_dir).as_posix()}"
            s3.client.upload_file(str(p), s3.bucket, f"in/{key}")
            ids.append(key)
    env = env_with(cli_env, s3, endpoint_var=False)
    out = tmp_path / "out"
    proc = run_cli(["label", f"s3://{s3.bucket}/in/", out, "--engine", "ray", "--runtime", "keras",
                    "--s3-endpoint", s3.server.endpoint, "--json", "--progress", "none"],
                   env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert (read_summary(proc)["labeled"], read_summary(proc)["errors"]) == (len(ids), 0)
    rows = pd.read_parquet(out)
    check_photo_rows(rows, ids, f"s3://{s3.bucket}/in/")
    assert (rows.status == "ok").all() and (rows.file_size > 0).all()
    for row in rows.itertuples():  # hashed in Ray's decode tasks from the bytes they read
        local = (photos_dir / row.image_id.split("/", 1)[1]).read_bytes()
        assert row.content_sha256 == hashlib.sha256(local).hexdigest(), row.image_id


@needs_ray
def test_ray_engine_writes_invalid_manifest_entries_as_error_rows(photos_dir, cli, tmp_path):
    """Ray tasks rebuild refs from plain columns: the reason an entry names no file travels too."""
    manifest, out = tmp_path / "list.csv", tmp_path / "out"
    manifest.write_text(f"id,path\ncat,{photos_dir / 'chelsea.jpg'}\nlost,\n")
    proc = _ray_label(cli, manifest, out, "--max-error-rate", "0.6")
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_parquet(out).set_index("image_id")
    assert rows.loc["cat", "label_id"] in SKIMAGE_PHOTOS["chelsea"]
    assert (rows.loc["lost", "error_kind"], rows.loc["lost", "error"]) == (
        "invalid_entry", "manifest list.csv line 3: no path given for id 'lost'")


@needs_ray
def test_a_local_run_starts_its_own_cluster_even_when_ray_names_a_current_one(photos_dir, cli_env,
                                                                              tmp_path):
    """`ray start`, and ray.cluster_utils.Cluster in another test, leave $RAY_TMPDIR/ray/
    ray_current_cluster behind; ray.init() without an address joins the cluster it names, even a
    dead or dying one. A run given no --ray-address must start its own."""
    import shutil
    import socket
    import tempfile

    with socket.socket() as s:  # a port nothing listens on: the cluster it names is gone
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
        out = tmp_path / "out"
        env = {k: v for k, v in cli_env.items() if k != "RAY_ADDRESS"}
        # before the fix the run hung trying to join the dead cluster: a short timeout
        proc = subprocess.run([sys.executable, "-m", "pipeline", "label", str(photos_dir), str(out),
                               "--engine", "ray", "--runtime", "keras", "--json", "--progress",
                               "none"], env=dict(env, RAY_TMPDIR=str(ray_tmp)),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert read_summary(proc)["labeled"] == 5
        assert dead not in proc.stderr
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
