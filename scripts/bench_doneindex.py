"""The done set's start-up with and without the done index, in-process, no model:

    PYTHONPATH=. python scripts/bench_doneindex.py N [WORK] [--s3]

Synthesizes (as `make bench-scale` does, kept in WORK/nN, default /tmp/bench-doneindex) an
OUTPUT of N labeled images and a manifest of those N plus 1,000 new; then two "nights" without
labeling: doneindex.done_set (night 1 builds from the parts, night 2 maps the saved index),
every manifest chunk checked against it as a run checks it (the done set's lookup handed to
the listing, sources.KnownIds), doneindex.refresh. Prints the CPU seconds of each
step and the peak RSS. --s3: the same OUTPUT uploaded to a moto_server this script starts on
127.0.0.1 (a fresh bucket), so night 1 reads the parts and night 2 the index from S3; each
step's wall seconds and moto_server's CPU seconds are printed too (the server is another
process: its CPU is not in ours).
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    import bench_scale as b
    import pyarrow.parquet as pq

    from pipeline import doneindex, doneset, store
    from pipeline.sources import KnownIds, SourceStats, iter_chunks

    args = [a for a in sys.argv[1:] if a != "--s3"]
    on_s3 = "--s3" in sys.argv[1:]
    n = b.counts(args[0])[0]
    case = Path(args[1] if len(args) > 1 else "/tmp/bench-doneindex") / f"n{n}"
    if not (case / "manifest.parquet").exists():
        case.mkdir(parents=True, exist_ok=True)
        new = b.write_new_images(case / "new")
        archived = b.write_new_images_single(case / "archived.jpg")
        b.write_archive(case / "out", n, 4096, archived, b.identity_metadata())
        b.write_manifest(case / "manifest.parquet", n, archived, new)
    meta = pq.read_schema(sorted((case / "out").glob("part-*.parquet"))[0]).metadata
    identity = doneset.Identity(*(meta[f"pipeline.{f}".encode()].decode() for f in
                                  ("model", "weights_sha256", "preprocessing", "runtime",
                                   "precision")))
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(moto_server()) if on_s3 else None
        out = s3_output(case / "out", server) if server else store.open_output(str(case / "out"))
        result: dict[str, float] = {}

        def step(name: str):
            return Step(result, name, server)

        for night in (1, 2):
            with step(f"night{night}_done_set"):
                done, basis = doneindex.done_set(out, identity)
            skipped = 0
            with step(f"night{night}_listing_check"):
                known = KnownIds()
                known.lookup = done.find
                for chunk in iter_chunks(str(case / "manifest.parquet"), SourceStats(), None, None,
                                         known=known):
                    found = chunk.found if chunk.found is not None else done.find(chunk.ids)
                    skipped += int(done.check_found(found, chunk.size, chunk.mtime_ns)[0].sum())
            with step(f"night{night}_refresh"):
                doneindex.refresh(out, identity, basis)
            assert skipped == n, (skipped, n)
    print(json.dumps({k: round(v, 3) for k, v in result.items()} |
                     {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10}))


class Step:
    """Records a step's CPU seconds (ours), and with a server its wall and the server's CPU."""

    def __init__(self, result: dict, name: str, server: subprocess.Popen | None):
        self.result, self.name, self.server = result, name, server

    def __enter__(self):
        self.t, self.wall = cpu(), time.monotonic()
        self.server_t = process_cpu(self.server.pid) if self.server else 0.0

    def __exit__(self, *exc):
        self.result[f"{self.name}_cpu_s"] = cpu() - self.t
        if self.server:
            self.result[f"{self.name}_wall_s"] = time.monotonic() - self.wall
            self.result[f"{self.name}_moto_cpu_s"] = process_cpu(self.server.pid) - self.server_t
        self.result[f"{self.name}_peak_rss_mib"] = resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss >> 10


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def moto_server():
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.endpoint = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(proc.endpoint, timeout=2).close()  # type: ignore[attr-defined]
                break
            except OSError:
                time.sleep(0.2)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def s3_output(local: Path, server):
    """`local`'s data files uploaded to a fresh bucket; its store."""
    import boto3

    from pipeline import store
    from pipeline.types import S3Options

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        os.environ.setdefault(k, v)
    client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="bench")
    for part in sorted(local.glob("part-*.parquet")):
        client.upload_file(str(part), "bench", f"out/{part.name}")
    return store.open_output("s3://bench/out/", S3Options(endpoint=server.endpoint))


if __name__ == "__main__":
    main()
