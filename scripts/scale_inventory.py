"""bench_scale's S3 Inventory case (`make bench-scale ARGS="--input inventory --sizes 10M"`).

An inventory's data files must be S3 objects (manifest.json names keys in its destination
bucket), so this case runs a moto_server in the bench's process (a thread: its CPU is not the
measured child's): N already-labeled keys (OUTPUT synthesized as for a manifest, every key
labeled with the inventory's size and mtime) listed in Parquet data files of 1M rows in AWS's
layout and schema, plus N_NEW real small JPEGs uploaded under new/ and listed at the end of the
last file. The CLI labels `s3://DEST/.../manifest.json` into a local OUTPUT; it downloads the
data files (checked against their MD5), so the time to the first new image includes that.
With --nights 2 (the default), a second night: a new inventory with N_NEW more images under
new2/ at its end, the same command, the done index the first night saved.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import bench_scale as scale

BUCKET, DEST = "photos", "photos-inventory"
FILE_ROWS = 1 << 20
MTIME_NS = 1_717_200_000 * 10**9  # whole ms: the inventory's last_modified_date is in ms
SCHEMA = ("message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); "
          "optional int64 size; optional int64 last_modified_date (TIMESTAMP_MILLIS); "
          "optional binary e_tag (UTF8); }")


def bench(work: Path, n: int, part_rows: int, keep: bool, code: str, nights: int = 1) -> dict:
    import boto3
    from bench_listing import CREDENTIALS, start_moto

    os.environ.update(CREDENTIALS)
    case = work / f"inventory-n{n}"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    server, endpoint = start_moto()
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        t = time.monotonic()
        new = scale.write_new_images(case / "new")
        archived = scale.write_new_images_single(case / "archived.jpg")
        os.utime(archived, ns=(MTIME_NS, MTIME_NS))
        scale.write_archive(case / "out", n, part_rows, archived, scale.identity_metadata())
        manifest = publish(s3, n, archived.stat().st_size, [new])
        synth = time.monotonic() - t
        scale.log(f"inventory N={n:,}: synthesized in {synth:.0f} s")
        env = dict(os.environ, AWS_ENDPOINT_URL=endpoint,
                   PYTHONPATH=code + os.pathsep + os.environ.get("PYTHONPATH", ""))
        result = scale.measured_label(manifest, case, n, new, env, code)
        if nights == 2 and result["exactly_the_new_images"]:
            result["second_night"] = second_night(s3, case, n, archived, new, env, code)
    finally:
        server.stop()
    result.update(input="s3 inventory", synthesis_seconds=round(synth, 1))
    scale.log(f"inventory N={n:,}: {json.dumps(result)}")
    if not keep:
        shutil.rmtree(case)
    if not result["exactly_the_new_images"] or \
            not result.get("second_night", {}).get("exactly_the_new_images", True):
        raise SystemExit(f"N={n}: a run did not label exactly the {scale.N_NEW} new images")
    return result


def second_night(s3, case: Path, n: int, archived: Path, new: list[Path], env: dict,
                 code: str) -> dict:
    """The next night's inventory: the N archived keys, the first night's new images (now
    labeled) and N_NEW more under new2/ at its end; the done index the first night saved."""
    if not (case / "out" / "_index" / "done.json").exists():
        raise SystemExit(f"inventory N={n}: the first night saved no done index")
    newer = scale.write_new_images(case / "new2")
    manifest = publish(s3, n, archived.stat().st_size, [new, newer], "2026-12-08T01-00Z")
    result = scale.measured_label(manifest, case, n + len(new), newer, env, code)
    scale.log(f"inventory N={n:,}, second night: {json.dumps(result)}")
    return result


def publish(s3, n: int, size: int, new: list[list[Path]], stamp: str = "2026-12-07T01-00Z"
            ) -> str:
    """Each list of `new` images under s3://photos/<its folder's name>/ (the last list
    uploaded now), the data files listing the N archived keys then those images, and
    manifest.json in the destination bucket; returns the manifest's URI."""
    import numpy as np
    import pyarrow as pa

    if len(new) == 1:
        for bucket in (BUCKET, DEST):
            s3.create_bucket(Bucket=bucket)
    for p in new[-1]:
        s3.put_object(Bucket=BUCKET, Key=f"{p.parent.name}/{p.name}", Body=p.read_bytes())
    listed = [o for folder in sorted({ps[0].parent.name for ps in new})
              for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                       Prefix=f"{folder}/")
              for o in page["Contents"]]
    new_rows = pa.table({
        "bucket": [BUCKET] * len(listed), "key": [o["Key"] for o in listed],
        "size": pa.array([o["Size"] for o in listed], pa.int64()),
        "last_modified_date": pa.array([o["LastModified"] for o in listed],
                                       pa.timestamp("ms", "UTC")),
        "e_tag": [o["ETag"].strip('"') for o in listed]})
    base = f"inventory/{BUCKET}/nightly"
    files = []
    for start in range(0, n, FILE_ROWS):
        k = min(FILE_ROWS, n - start)
        keys = scale.image_id(np.arange(start, start + k))
        table = pa.table({
            "bucket": pa.DictionaryArray.from_arrays(np.zeros(k, np.int32), [BUCKET]).cast(
                pa.string()),
            "key": keys, "size": np.full(k, size, np.int64),
            "last_modified_date": pa.array(np.full(k, MTIME_NS // 10**6, np.int64)).cast(
                pa.timestamp("ms", "UTC")),
            "e_tag": pa.DictionaryArray.from_arrays(np.zeros(k, np.int32), ["0" * 32]).cast(
                pa.string())})
        if start + k >= n:
            table = pa.concat_tables([table, new_rows.cast(table.schema)])
        files.append(_put_parquet(s3, f"{base}/data/{len(files):05d}.parquet", table))
    manifest = {"sourceBucket": BUCKET, "destinationBucket": f"arn:aws:s3:::{DEST}",
                "version": "2016-11-30", "creationTimestamp": "1796086800000",
                "fileFormat": "Parquet", "fileSchema": SCHEMA, "files": files}
    key = f"{base}/{stamp}/manifest.json"
    s3.put_object(Bucket=DEST, Key=key, Body=json.dumps(manifest).encode())
    return f"s3://{DEST}/{key}"


def _put_parquet(s3, key: str, table) -> dict:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="snappy")  # as AWS writes them
    data = sink.getvalue()
    s3.put_object(Bucket=DEST, Key=key, Body=data)
    return {"key": key, "size": len(data), "MD5checksum": hashlib.md5(data).hexdigest()}


if __name__ == "__main__":
    sys.exit("run it through scripts/bench_scale.py --input inventory")
