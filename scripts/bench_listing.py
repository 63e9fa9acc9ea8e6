"""Does an S3 listing stay flat? Peak RSS and time to the first committed part for a nightly run
over an S3 prefix of N objects (default 10k and 100k) on moto_server, N - 1000 of them already
labeled in OUTPUT and 1000 new ones spread over the whole key range.

For each N: upload N small real JPEGs to a fresh bucket, synthesize OUTPUT for the labeled ones
(rows in the writer's schema, copied from a real part the CLI wrote for one seed image, with
each object's listed size and mtime), then run `pipeline label s3://bucket/in/ OUTPUT` and poll
its VmHWM (peak RSS of the process; ru_maxrss of a child would start at the parent's size) and
OUTPUT for the first part. Not a test: numbers depend on the machine and its load.

    python scripts/bench_listing.py [--sizes 10000 100000] [--code /other/checkout]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEW = 1000
PART_ROWS = 4096
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_REGION": "us-east-1"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--code", default=str(ROOT), help="checkout whose `pipeline` runs (compare)")
    p.add_argument("--out", default=str(ROOT / "bench-results" / "bench_listing.json"))
    args = p.parse_args()
    os.environ.update(CREDENTIALS)
    work = Path(tempfile.mkdtemp(prefix="bench-listing-"))
    server, endpoint = start_moto()
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "XDG_CACHE_HOME": str(work / "cache"),
           "PYTHONPATH": args.code}
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        jpeg = small_jpeg()
        template = seed_part(s3, jpeg, work, env)
        results = []
        for n in args.sizes:
            results.append(measure(s3, n, jpeg, template, work, env))
            print(json.dumps(results[-1]), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"code": args.code, "loadavg": os.getloadavg(),
                                              "results": results}, indent=2))
        print_table(results)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def start_moto():
    """moto_server in this process (a thread), so objects can be created straight in its
    backend: 100k PUTs over HTTP take longer than the runs measured. The CLI talks HTTP to it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return server, endpoint
        except OSError:
            time.sleep(0.2)
    raise SystemExit("moto_server did not start")


def small_jpeg() -> bytes:
    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).resize((64, 48)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def seed_part(s3, jpeg: bytes, work: Path, env: dict):
    """One real part written by the CLI: its schema, file metadata and a row to copy."""
    import pyarrow.parquet as pq

    s3.create_bucket(Bucket="seed")
    s3.put_object(Bucket="seed", Key="in/seed.jpg", Body=jpeg)
    out = work / "seed-out"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "label", "s3://seed/in/", str(out),
                           "--progress", "none"], env=env, capture_output=True, text=True,
                          cwd=env["PYTHONPATH"])
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return pq.read_table(next(out.glob("part-*.parquet")))


def upload(s3, bucket: str, n: int, jpeg: bytes) -> list[dict]:
    s3.create_bucket(Bucket=bucket)
    keys = [f"in/d{i % 100:02d}/img{i:07d}.jpg" for i in range(n)]
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key in keys:
        backend.put_object(bucket, key, jpeg)
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="in/"):
        objects.extend(page["Contents"])
    return objects


def synthesize_output(out: Path, bucket: str, done: list[dict], template) -> None:
    """Parts in the writer's schema saying `done` are labeled (with their listed size, mtime)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    (out / "_runs").mkdir()
    row = template.slice(0, 1)
    for seq, start in enumerate(range(0, len(done), PART_ROWS)):
        chunk = done[start:start + PART_ROWS]
        part = pa.concat_tables([row] * len(chunk))
        replace = {
            "image_id": pa.array([o["Key"][len("in/"):] for o in chunk]),
            "uri": pa.array([f"s3://{bucket}/{o['Key']}" for o in chunk]),
            "file_size": pa.array([o["Size"] for o in chunk], pa.int64()),
            "mtime": pa.array([o["LastModified"] for o in chunk], pa.timestamp("us", "UTC")),
        }
        for name, values in replace.items():
            i = part.schema.get_field_index(name)
            part = part.set_column(i, part.schema.field(i), values.cast(part.schema.field(i).type))
        pq.write_table(part, out / f"part-20260101T000000Z-synthetic-{seq:05d}.parquet")


def measure(s3, n: int, jpeg: bytes, template, work: Path, env: dict) -> dict:
    bucket = f"bench-{n}"
    t0 = time.monotonic()
    objects = upload(s3, bucket, n, jpeg)
    uploaded = time.monotonic() - t0
    step = max(1, n // NEW)
    new = {o["Key"] for o in objects[::step][:NEW]}
    out = work / f"out-{n}"
    synthesize_output(out, bucket, [o for o in objects if o["Key"] not in new], template)
    before = set(out.glob("part-*.parquet"))
    cmd = [sys.executable, "-m", "pipeline", "label", f"s3://{bucket}/in/", str(out),
           "--part-size", "100", "--json", "--progress", "none"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=env["PYTHONPATH"])  # `-m` imports from the cwd first
    peak, first_part = 0, None
    while proc.poll() is None:
        peak = max(peak, vm_hwm(proc.pid))
        if first_part is None and set(out.glob("part-*.parquet")) - before:
            first_part = time.monotonic() - started
        time.sleep(0.05)
    wall = time.monotonic() - started
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"N={n}: exit {proc.returncode}: {stderr[-2000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"objects": n, "new": len(new), "labeled": summary["labeled"],
            "skipped": summary["skipped"], "peak_rss_mib": round(peak / 2**20, 1),
            "first_part_seconds": round(first_part, 1) if first_part else None,
            "wall_seconds": round(wall, 1), "upload_seconds": round(uploaded, 1)}


def vm_hwm(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(m.group(1)) * 1024 if m else 0


def print_table(results: list[dict]) -> None:
    print("| objects | new | labeled | skipped | peak RSS | first part | wall |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['objects']:,} | {r['new']} | {r['labeled']} | {r['skipped']:,} | "
              f"{r['peak_rss_mib']} MiB | {r['first_part_seconds']} s | {r['wall_seconds']} s |")


if __name__ == "__main__":
    sys.exit(main())
