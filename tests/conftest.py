"""Shared fixtures: real photos, the shared ImageNet sample, and the CLI as a subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import chaos  # noqa: E402  (scripts/chaos.py: the crash machinery `make chaos` uses)

SHARED_IMAGES = chaos.SHARED  # ../shared/images/imagenet-sample-100; PIPELINE_SHARED_IMAGES overrides

# scikit-image photos and the ImageNet classes any one of which must be in their top-5
CATS = {"n02123045", "n02123159", "n02124075", "n02123394", "n02123597"}
SKIMAGE_PHOTOS = {
    "chelsea": CATS,
    "coffee": {"n07920052", "n03063599", "n07930864"},  # espresso, coffee mug, cup
    "astronaut": None,
    "rocket": {"n03773504", "n04008634", "n04266014"},  # missile, projectile, space shuttle
    "motorcycle": {"n03785016", "n03791053"},  # moped, motor scooter
}


def skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


@pytest.fixture
def sighup_not_ignored():
    """SIGHUP as a session's shell leaves it, also when the suite itself runs under nohup: an
    ignored SIGHUP is inherited and the CLI keeps it ignored on purpose, which would hide what
    a test of SIGHUP checks. A handler of our own (reset to the default in a child at exec)
    stands in for the ignore while the test runs, so a real hangup still ends nothing."""
    before = signal.getsignal(signal.SIGHUP)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, lambda *_: None)
    yield
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, before)


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory) -> Path:
    """One weights cache for the whole session, so the .pth is converted once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def cli_env(cache_home) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(cache_home)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def cli(cli_env):
    def call(*args, **kw):
        return run_cli(list(args), cli_env, **kw)
    return call


def save_photo(array: np.ndarray, path: Path, **kw) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def reader_input(pixels: np.ndarray, pre) -> np.ndarray:
    """The float32 model input the reader's decode step (image_from_bytes) makes of uint8
    pixels saved as a lossless PNG, uncropped; pixels of the model's size resize 1:1."""
    import dataclasses
    import io

    from PIL import Image

    from pipeline.reader import image_from_bytes

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    uncropped = dataclasses.replace(pre, crop_fraction=None)
    image, _, _ = image_from_bytes(buffer.getvalue(), uncropped, 10**8)
    return image.numpy()


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """scikit-image's real photos, as JPEG and PNG, in a small tree."""
    d = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(SKIMAGE_PHOTOS):
        img = skimage_photo(name)
        if i % 2:
            save_photo(img, d / "png" / f"{name}.PNG")
        else:
            save_photo(img, d / f"{name}.jpg", quality=92)
    (d / "notes.txt").write_text("not an image")
    return d


def write_hundred_photos(directory: Path) -> list[str]:
    """100 good photos into `directory`: the shared ImageNet sample when present, else real
    scikit-image photos re-encoded (crops, flips, JPEG qualities) to reach 100. Their names."""
    import shutil

    directory.mkdir(parents=True)
    if SHARED_IMAGES.is_dir():
        for path in sorted(SHARED_IMAGES.iterdir()):
            shutil.copy(path, directory / path.name)
    else:
        photos = [skimage_photo(name) for name in SKIMAGE_PHOTOS]
        for i in range(100):
            img = photos[i % len(photos)]
            h, w = img.shape[:2]
            img = img[i % 7: h - i % 5, i % 3: w - i % 11]
            img = img[:, ::-1] if i % 2 else img
            save_photo(np.ascontiguousarray(img), directory / f"photo_{i:03d}.jpg", quality=70 + i % 30)
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="session")
def hundred_photos(tmp_path_factory) -> Path:
    """A folder of 100 real photos (see write_hundred_photos): runs in a fresh clone too."""
    d = tmp_path_factory.mktemp("hundred") / "photos"
    write_hundred_photos(d)
    return d


@pytest.fixture(scope="session")
def shared_images() -> Path:
    if not SHARED_IMAGES.is_dir():
        pytest.skip(f"{SHARED_IMAGES} is not present (fresh clone)")
    return SHARED_IMAGES


# The photo sets whose figures a test's thresholds are set from: the shared sample when present,
# else the scikit-image fallback (hundred_photos), or the sample alone (shared_images: skipped
# without it). Tests that use one are marked `shared`; `.ci/run` runs them a second time with
# PIPELINE_SHARED_IMAGES= (hidden), as a user's fresh clone has them. Other fixtures also take
# some photos from the sample (originals, the bad-input dump, Ray's two_hundred), but their tests
# compare two runs on the same photos, so which photos they are does not decide pass or fail.
SHARED_FIXTURES = {"hundred_photos", "shared_images"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SHARED_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.shared)


def read_summary(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- crash / resume helpers (scripts/chaos.py holds the machinery `make chaos` uses) -----------


@pytest.fixture(scope="session")
def originals(tmp_path_factory) -> Path:
    """~20 distinct real photos as small JPEGs (half from the shared sample when present)."""
    d = tmp_path_factory.mktemp("originals")
    chaos.make_originals(d)
    return d


@pytest.fixture(scope="session")
def reference(originals, cli_env, tmp_path_factory) -> dict[str, dict]:
    """file name -> the row a clean run gives each original."""
    return chaos.reference_labels(originals, tmp_path_factory.mktemp("ref") / "out", cli_env)


@pytest.fixture
def replicas(originals, tmp_path):
    """replicas(copies) -> a folder holding every original `copies` times under other names."""
    def make(copies: int, name: str = "in") -> Path:
        chaos.replicate(sorted(originals.glob("*.jpg")), tmp_path / name, copies)
        return tmp_path / name
    return make


def labeled_rows(output: Path):
    """Every row of OUTPUT as a pandas DataFrame (what a reader sees)."""
    import pandas as pd

    return pd.read_parquet(output)


LATEST = """SELECT * FROM read_parquet('{out}/part-*.parquet', union_by_name = true)
QUALIFY row_number() OVER (PARTITION BY image_id, model ORDER BY labeled_at DESC) = 1"""


def latest(output: Path):
    """The README's DuckDB query for the current label of every image (a DataFrame)."""
    duckdb = pytest.importorskip("duckdb")
    return duckdb.sql(LATEST.format(out=output)).df().sort_values("image_id").reset_index(drop=True)


@pytest.fixture
def small_fs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (root only; skips where mounting is refused)."""
    mounted = []

    def mount(size: str = "1m") -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                                  capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command here")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["mount", "-o", "remount,rw", str(d)], capture_output=True)
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


# -- S3: a real S3-compatible server (moto_server) on a free local port ------------------------

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_REGION": "us-east-1"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """A running moto_server: an object with .endpoint, .proc (for SIGSTOP/SIGCONT)."""
    import shutil
    import time
    import types
    import urllib.request

    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(exe).exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto_server did not start")
            time.sleep(0.2)
    yield types.SimpleNamespace(endpoint=endpoint, proc=proc)
    proc.kill()
    proc.wait()


@pytest.fixture
def s3(moto_server, monkeypatch):
    """A fresh bucket on moto: .bucket, .client (boto3), .fs (pyarrow), .env (for the CLI)."""
    import secrets
    import types

    import boto3
    from pyarrow import fs

    for k, v in S3_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    bucket = f"test-{secrets.token_hex(4)}"
    client = boto3.client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    pafs = fs.S3FileSystem(endpoint_override=moto_server.endpoint.split("://")[1], scheme="http",
                           region="us-east-1", access_key="testing", secret_key="testing")
    return types.SimpleNamespace(bucket=bucket, client=client, fs=pafs, server=moto_server,
                                 env={**S3_CREDENTIALS, "AWS_ENDPOINT_URL": moto_server.endpoint})


def s3_clock(client, bucket: str, key: str):
    """(the server's time, the object's Last-Modified), both from S3 (whole seconds)."""
    import email.utils

    head = client.head_object(Bucket=bucket, Key=key)
    return email.utils.parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"]), head["LastModified"]


def wait_until_s3_age(client, bucket: str, key: str, older_than: float, since=None, timeout: float = 60):
    """Until the server's clock is more than `older_than` s past the object's Last-Modified (or
    past `since`): how a lock's lease runs out, on the clock that decides it."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        now, modified = s3_clock(client, bucket, key)
        if (now - (since or modified)).total_seconds() > older_than:
            return
        assert time.monotonic() < deadline, f"{key} is still not {older_than} s old"
        time.sleep(0.1)


def upload_dir(client, bucket: str, local: Path, prefix: str) -> list[str]:
    """Upload every file under `local` to s3://bucket/prefix/...; returns the relative keys."""
    keys = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        client.upload_file(str(path), bucket, f"{prefix}/{rel}")
        keys.append(rel)
    return keys


def read_s3_rows(pafs, uri: str):
    """Every row of the Parquet parts under an s3:// OUTPUT (pyarrow.dataset on S3), as pandas."""
    import pyarrow.dataset as pads

    base = uri[len("s3://"):].rstrip("/")
    from pyarrow import fs as pafs_mod
    infos = pafs.get_file_info(pafs_mod.FileSelector(base, recursive=False))
    parts = sorted(i.path for i in infos if i.base_name.startswith("part-")
                   and i.base_name.endswith(".parquet"))
    return pads.dataset(parts, format="parquet", filesystem=pafs).to_table().to_pandas()
