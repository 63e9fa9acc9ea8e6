"""`make bench-scale`: what a nightly run costs when the archive is big and the night is small.

For each N (default 1M, 10M, 50M) it synthesizes, fast and with pyarrow, an OUTPUT of N
already-labeled images in the writer's schema and file metadata (4096-row parts, as runs
write them) and a Parquet manifest (id, path, size, mtime, as an S3 Inventory has them) listing
those N images plus 1,000 new real small JPEGs at its end. The N labeled entries all point at
one real JPEG (the archive's rows carry its size and mtime); with size and mtime columns the
listing trusts them and stats nothing (a manifest without them is stat'ed per entry).
Then it runs the real CLI, `python -m pipeline label MANIFEST OUTPUT --json`, and reports its
peak RSS (os.wait4's ru_maxrss), the seconds until the done set was built and until the first
new image was handed to the reader (from the run manifest's `timings`), and the wall time. It
checks that exactly the 1,000 new images were labeled and the N others skipped.

Then (unless --nights 1) the second night: 1,000 more new JPEGs appended to the manifest, and
the same command again, now with the done index the first night saved under OUTPUT/_index
(memory-mapped, the first night's parts merged in): the same measurements, and exactly the
second 1,000 labeled, N + 1,000 skipped.

`--done-set-only` instead builds the done set alone in a child process and checks every
manifest entry against it, a record batch at a time as a run does.

Synthesized data is deleted after each N unless --keep. Results: bench-results/bench_scale.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
N_NEW = 1000
MODEL = "efficientnet_lite0"
LABELED_AT = dt.datetime(2025, 6, 1, tzinfo=dt.timezone.utc)


def main() -> int:
    args = parse_args()
    work = Path(args.work).resolve()  # the CLI runs in --code
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "part_rows": args.part_rows}
    if args.synthesize_only:
        for n in args.sizes:
            (synthesize(work, n, args.part_rows)[0] / ".synthesized").touch()
        return 0
    if args.input == "inventory":
        import scale_inventory

        results["inventory_runs"] = [scale_inventory.bench(work, n, args.part_rows, args.keep,
                                                           args.code, args.nights)
                                     for n in args.sizes]
        report_runs(results["inventory_runs"])
        seconds = [r["second_night"] for r in results["inventory_runs"] if "second_night" in r]
        if seconds:
            print("second night (the done index present):")
            report_runs(seconds)
    elif args.done_set_only:
        results["done_set_only"] = [done_set_only(work, n, args.part_rows, args.keep)
                                    for n in args.sizes]
    else:
        results["runs"] = [bench_one(work, n, args.part_rows, args.keep, args.code, args.nights)
                           for n in args.sizes]
        report_runs(results["runs"])
        if args.nights == 2:
            results["second_nights"] = [r["second_night"] for r in results["runs"]]
            print("second night (the done index present):")
            report_runs(results["second_nights"])
    results["machine"]["loadavg_end"] = os.getloadavg()
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    name = ("bench_scale_inventory.json" if args.input == "inventory" else
            "bench_scale_done_set.json" if args.done_set_only else "bench_scale.json")
    (out / name).write_text(json.dumps(results, indent=2))
    log(f"wrote {out / name}")
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=counts, default=counts("1M,10M,50M"),
                   help="N already-labeled images per case (1M,10M,50M)")
    p.add_argument("--part-rows", type=int, default=4096, help="rows per synthesized part")
    p.add_argument("--work", default="/tmp/bench-scale", help="where the data is synthesized")
    p.add_argument("--keep", action="store_true", help="keep the synthesized data")
    p.add_argument("--synthesize-only", action="store_true",
                   help="only make the data in --work (a later run there uses it)")
    p.add_argument("--done-set-only", action="store_true",
                   help="no CLI: build the done set and look the whole manifest up in it, in a "
                        "child process (reuses data kept in --work)")
    p.add_argument("--input", choices=("manifest", "inventory"), default="manifest",
                   help="what lists the archive: a Parquet manifest, or an S3 Inventory "
                        "(Parquet data files of 1M rows on a moto_server started here)")
    p.add_argument("--nights", type=int, choices=(1, 2), default=2,
                   help="2: also measure a second night, with the done index the first saved")
    p.add_argument("--code", default=str(ROOT),
                   help="checkout whose `pipeline` the CLI runs (to compare two versions)")
    return p.parse_args()


def counts(text: str) -> list[int]:
    scale = {"k": 1_000, "M": 1_000_000}
    return [int(float(t[:-1]) * scale[t[-1]]) if t[-1] in scale else int(t)
            for t in text.split(",")]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict:
    return {"nproc": os.cpu_count(), "loadavg_start": os.getloadavg(),
            "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


# -- synthesis ---------------------------------------------------------------------------------

def image_id(i: np.ndarray):
    """Ids like a dated camera dump: '2024/06/17/IMG_00012345.jpg' (27 characters), as an
    Arrow array built with vectorized kernels (50M ids in seconds)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    days = [f"{2020 + d // 365}/{(d % 365) // 31 + 1:02d}/{d % 31 + 1:02d}/IMG_" for d in range(4000)]
    day = pa.array(days).take(pa.array(i // 50_000))
    number = pc.utf8_lpad(pa.array(i).cast(pa.string()), width=8, padding="0")
    return pc.binary_join_element_wise(day, number, pa.scalar(".jpg"), "")


def identity_metadata() -> dict[str, str]:
    """The file metadata a run of MODEL on this host writes (so the archive counts as done)."""
    from pipeline import __version__, devices, models
    from pipeline.doneset import Identity
    from pipeline.config import RunConfig

    cfg = RunConfig(model=MODEL)
    spec = models.get(cfg.model_request())
    plan = devices.plan(cfg, [])
    identity = Identity(spec.name, spec.weights_sha256, spec.preprocess.describe(),
                        plan.runtime, plan.dtype_policy)
    return {**identity.metadata(), "pipeline.weights_source": spec.weights_source,
            "pipeline.top_k": "5", "pipeline.version": __version__}


def write_archive(output: Path, n: int, part_rows: int, archived: Path, metadata: dict) -> None:
    """N ok rows for ids 0..N-1, in the writer's schema, `part_rows` per part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store.schema import SCHEMA

    output.mkdir(parents=True)
    (output / "_runs").mkdir()
    st = archived.stat()
    schema = SCHEMA.with_metadata(metadata)
    labels = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
    names = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]
    k = min(part_rows, n)  # every column but image_id is the same in every part
    offsets = pa.array(np.arange(0, 5 * k + 1, 5, dtype=np.int32))
    template = {
        "image_id": pa.array([""] * k, pa.string()),
        "uri": pa.array([str(archived)] * k, pa.string()),
        "status": pa.array(["ok"] * k, pa.string()),
        "error_kind": pa.nulls(k, pa.string()), "error": pa.nulls(k, pa.string()),
        "width": pa.array(np.full(k, 256, np.int32)), "height": pa.array(np.full(k, 192, np.int32)),
        "file_size": pa.array(np.full(k, st.st_size, np.int64)),
        "mtime": pa.array(np.full(k, st.st_mtime_ns // 1000, np.int64)).cast(
            pa.timestamp("us", tz="UTC")),
        "label_id": pa.array([labels[0]] * k), "label": pa.array([names[0]] * k),
        "score": pa.array(np.full(k, 0.9, np.float32)),
        "label_ids": pa.ListArray.from_arrays(offsets, pa.array(labels * k)),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(names * k)),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(np.tile(
            np.array([0.9, 0.05, 0.02, 0.02, 0.01], np.float32), k))),
        "model": pa.array([MODEL] * k), "run_id": pa.array(["20250601T000000Z-synth"] * k),
        "labeled_at": pa.array([LABELED_AT] * k, pa.timestamp("us", tz="UTC")),
    }
    template = pa.table({f.name: template.get(f.name, pa.nulls(k, f.type)) for f in schema},
                        schema=schema)  # columns added to the schema later (content_sha256): null
    block, block_start = None, 0
    for seq, start in enumerate(range(0, n, part_rows)):
        k = min(part_rows, n - start)
        if block is None or start + k > block_start + len(block):  # ids made 1M at a time
            block_start = start
            block = image_id(np.arange(start, min(n, start + max(part_rows, 1 << 20))))
        ids = block.slice(start - block_start, k)
        table = template.slice(0, k).set_column(0, schema.field("image_id"), ids)
        pq.write_table(table, output / f"part-20250601T000000Z-synth-{seq:06d}.parquet",
                       compression="zstd")


def write_new_images(dest: Path) -> list[Path]:
    """N_NEW distinct small real JPEGs: crops of scikit-image's photos."""
    import skimage.data
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"):
        a = getattr(skimage.data, name)()
        photos.append(np.ascontiguousarray(a[..., :3]).astype(np.uint8))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_NEW):
        a = photos[i % len(photos)]
        h, w = a.shape[:2]
        y, x = rng.integers(0, h // 3), rng.integers(0, w // 3)
        img = Image.fromarray(a[y:y + 2 * h // 3, x:x + 2 * w // 3])
        img.thumbnail((160, 160))
        paths.append(dest / f"new{i:04d}.jpg")
        img.save(paths[-1], quality=85)
    return paths


def write_manifest(path: Path, n: int, archived: Path, new: list[Path]) -> None:
    """id, path, size, mtime: the N archived ids (all at one real file), then the new images.
    With size and mtime columns (as an S3 Inventory has) the listing trusts them: no stat."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("path", pa.string()), ("size", pa.int64()),
                        ("mtime", pa.timestamp("us", tz="UTC"))])
    st = archived.stat()
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for start in range(0, n, 1 << 20):
            ids = image_id(np.arange(start, min(n, start + (1 << 20))))
            k = len(ids)
            paths = pa.DictionaryArray.from_arrays(np.zeros(k, np.int32), [str(archived)])
            w.write_table(pa.table({
                "id": ids, "path": paths.cast(pa.string()),
                "size": np.full(k, st.st_size, np.int64),
                "mtime": pa.array(np.full(k, st.st_mtime_ns // 1000, np.int64)).cast(
                    pa.timestamp("us", tz="UTC"))}, schema=schema))
        stats = [p.stat() for p in new]
        w.write_table(pa.table({
            "id": [f"{p.parent.name}/{p.name}" for p in new], "path": [str(p) for p in new],
            "size": [s.st_size for s in stats],
            "mtime": pa.array([s.st_mtime_ns // 1000 for s in stats]).cast(
                pa.timestamp("us", tz="UTC"))}, schema=schema))


# -- the measured run --------------------------------------------------------------------------

def run_measured(args: list[str], env: dict | None = None, cwd: str | None = None
                 ) -> tuple[int, float, int, str, str, float]:
    """(exit code, wall seconds, peak RSS bytes, stdout, stderr, CPU seconds) of a child
    process. CPU seconds (user + system) move less with the load of a shared machine than the
    wall time does."""
    start = time.monotonic()
    with open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(args, stdin=devnull, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, text=True, cwd=cwd)
        out, err = _communicate_and_wait4(proc)
    usage = proc._rusage
    return (proc.returncode, time.monotonic() - start, usage.ru_maxrss * 1024, out, err,
            usage.ru_utime + usage.ru_stime)


def _communicate_and_wait4(proc: subprocess.Popen) -> tuple[str, str]:
    import threading

    chunks = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda s, k: chunks[k].append(s.read()), args=(s, k))
               for s, k in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for t in readers:
        t.start()
    _, status, rusage = os.wait4(proc.pid, 0)
    for t in readers:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc._rusage = rusage
    return "".join(chunks["out"]), "".join(chunks["err"])


def synthesize(work: Path, n: int, part_rows: int) -> tuple[Path, float]:
    """work/nN with OUTPUT, manifest and images; one made by --synthesize-only (marked
    `.synthesized`, nothing labeled in it yet) is used as it is."""
    case = work / f"n{n}"
    if (case / ".synthesized").exists():
        return case, 0.0
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    new = write_new_images(case / "new")
    archived = write_new_images_single(case / "archived.jpg")
    t = time.monotonic()
    write_archive(case / "out", n, part_rows, archived, identity_metadata())
    write_manifest(case / "manifest.parquet", n, archived, new)
    synth = time.monotonic() - t
    log(f"N={n:,}: synthesized in {synth:.0f} s ({du(case) / 2**30:.2f} GiB)")
    return case, synth


def bench_one(work: Path, n: int, part_rows: int, keep: bool, code: str = str(ROOT),
              nights: int = 1) -> dict:
    case, synth = synthesize(work, n, part_rows)
    (case / ".synthesized").unlink(missing_ok=True)  # it is labeled below: not reusable after
    new = sorted((case / "new").glob("*.jpg"))
    assert len(new) == N_NEW, f"{case / 'new'} holds {len(new)} images"
    env = dict(os.environ, PYTHONPATH=code + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = measured_label(str(case / "manifest.parquet"), case, n, new, env, code)
    result["synthesis_seconds"] = round(synth, 1)
    log(f"N={n:,}: {json.dumps(result)}")
    if nights == 2 and result["exactly_the_new_images"]:
        result["second_night"] = second_night(case, n, new, env, code)
    if not keep:
        shutil.rmtree(case)
    if not result["exactly_the_new_images"] or \
            not result.get("second_night", {}).get("exactly_the_new_images", True):
        raise SystemExit(f"N={n}: a run did not label exactly the {N_NEW} new images")
    return result


def second_night(case: Path, n: int, new: list[Path], env: dict, code: str) -> dict:
    """The next night: N + the first night's images archived, N_NEW more new ones listed."""
    if not (case / "out" / "_index" / "done.json").exists():
        raise SystemExit(f"N={n}: the first night saved no done index")
    newer = write_new_images(case / "new2")
    manifest = case / "manifest2.parquet"
    write_manifest(manifest, n, case / "archived.jpg", new + newer)
    result = measured_label(str(manifest), case, n + len(new), newer, env, code)
    log(f"N={n:,}, second night: {json.dumps(result)}")
    return result


def measured_label(input_path: str, case: Path, n: int, new: list[Path], env: dict,
                   code: str) -> dict:
    """`pipeline label INPUT case/out --json` measured (in `code`: `python -m` imports the
    working directory's `pipeline` first), and checked: exactly the new images (ids
    new/<name>) labeled, the N others skipped."""
    import pyarrow.dataset as ds

    load_start = os.getloadavg()
    code, wall, rss, out, err, cpu = run_measured(
        [sys.executable, "-m", "pipeline", "label", input_path, str(case / "out"), "--json"], env,
        code)
    if code != 0:
        raise SystemExit(f"N={n}: the run exited {code}: {err[-2000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    manifest = json.loads((case / "out" / "_runs" / f"{summary['run_id']}.json").read_text())
    rows = ds.dataset(str(case / "out"), format="parquet").to_table(
        columns=["image_id"], filter=ds.field("run_id") == summary["run_id"])
    labeled_ids = sorted(rows.column("image_id").to_pylist())
    correct = (labeled_ids == sorted(f"{p.parent.name}/{p.name}" for p in new)
               and summary["labeled"] == N_NEW and summary["skipped"] == n
               and summary["errors"] == 0)
    result = {"n": n, "peak_rss_bytes": rss, "wall_seconds": round(wall, 1),
              "cpu_seconds": round(cpu, 1),
              "done_set_seconds": manifest.get("timings", {}).get("done_set_seconds"),
              "first_new_image_seconds": manifest.get("timings", {}).get("first_pending_seconds"),
              "labeled": summary["labeled"], "skipped": summary["skipped"],
              "errors": summary["errors"], "exactly_the_new_images": correct,
              "disk_bytes": du(case), "loadavg_start": load_start,
              "loadavg_end": os.getloadavg()}
    return result


def write_new_images_single(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.full((192, 256, 3), 120, np.uint8)).save(path, quality=85)
    return path


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def report_runs(runs: list[dict]) -> None:
    base = runs[0]
    print(f"{'N labeled':>12} {'peak RSS MB':>12} {'B/image > first':>16} {'done set s':>11} "
          f"{'first new s':>12} {'wall s':>8} {'CPU s':>8} {'exact':>6}")
    for r in runs:
        extra = r["n"] - base["n"]
        per = (r["peak_rss_bytes"] - base["peak_rss_bytes"]) / extra if extra else float("nan")
        print(f"{r['n']:>12,} {r['peak_rss_bytes'] / 2**20:>12.0f} {per:>16.1f} "
              f"{r['done_set_seconds']:>11} {r['first_new_image_seconds']:>12} "
              f"{r['wall_seconds']:>8} {r.get('cpu_seconds', '')!s:>8} "
              f"{str(r['exactly_the_new_images']):>6}")
    if len(runs) > 1 and all(r.get("cpu_seconds") is not None for r in runs):
        first, last = runs[0], runs[-1]
        per = (last["cpu_seconds"] - first["cpu_seconds"]) / (last["n"] - first["n"]) * 1e6
        print(f"CPU per archived image between N={first['n']:,} and N={last['n']:,}: "
              f"{per:.2f} us")


# -- the done set alone --------------------------------------------------------------------

LOOKUP = """
import sys, time, resource, json
import pyarrow.parquet as pq
from pipeline import doneset, store
import numpy as np
out, manifest, size, mtime_ns = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
meta = pq.read_schema(sorted(__import__("glob").glob(out + "/part-*.parquet"))[0]).metadata
identity = doneset.Identity(*(meta[f"pipeline.{{f}}".encode()].decode() for f in
    ("model", "weights_sha256", "preprocessing", "runtime", "precision")))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.monotonic()
done = doneset.done_set(store.open_output(out), identity)
built = time.monotonic() - t
after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.monotonic()
skipped = listed = 0
pf = pq.ParquetFile(manifest)
for batch in pf.iter_batches(65536, columns=["id"]):
    k = batch.num_rows
    is_done, _ = done.check_columns(batch.column(0), np.full(k, size, np.int64),
                                    np.full(k, mtime_ns, np.int64))
    skipped += int(is_done.sum())
    listed += k
print(json.dumps({{"old_looked_up": listed - pf.metadata.row_group(pf.num_row_groups - 1).num_rows,
                  "base": base * 1024, "after_build": after_build * 1024, "entries": len(done),
                  "nbytes": done.nbytes, "build_seconds": built,
                  "lookup_seconds": time.monotonic() - t, "listed": listed, "skipped": skipped}}))
"""


def done_set_only(work: Path, n: int, part_rows: int, keep: bool) -> dict:
    """The done set alone at N: build it and check every manifest entry (new ones included)."""
    case = work / f"n{n}"
    if not (case / "manifest.parquet").exists():
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir(parents=True)
        new = write_new_images(case / "new")
        archived = write_new_images_single(case / "archived.jpg")
        write_archive(case / "out", n, part_rows, archived, identity_metadata())
        write_manifest(case / "manifest.parquet", n, archived, new)
    st = (case / "archived.jpg").stat()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code, wall, rss, out, err, cpu = run_measured(
        [sys.executable, "-c", LOOKUP.format(), str(case / "out"), str(case / "manifest.parquet"),
         str(st.st_size), str(st.st_mtime_ns)], env)
    if code != 0:
        raise SystemExit(err[-3000:])
    r = json.loads(out)
    result = {"n": n, "peak_rss_bytes": rss, "after_imports_rss_bytes": r["base"],
              "bytes_per_image": round((rss - r["base"]) / n, 1),
              "done_set_nbytes_per_image": round(r["nbytes"] / n, 1),
              "build_seconds": round(r["build_seconds"], 1),
              "lookup_seconds": round(r["lookup_seconds"], 1),
              "lookup_us_per_ref": round(r["lookup_seconds"] / r["listed"] * 1e6, 2),
              "cpu_seconds": round(cpu, 1),
              "looked_up": r["listed"],
              "exact": r["skipped"] == r["old_looked_up"] and r["listed"] == r["old_looked_up"] + N_NEW,
              "loadavg": os.getloadavg()}
    log(f"done set only, N={n:,}: {json.dumps(result)}")
    if not keep:
        shutil.rmtree(case)
    return result


if __name__ == "__main__":
    sys.exit(main())
