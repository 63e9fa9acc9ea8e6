"""`make bench`: how fast is labeling here, and how close to what the hardware allows?

In one run, on the same 1000 real-sized JPEGs (the shared ImageNet sample re-encoded 10 times
with slightly different crops and qualities; generated ~500x375 photos if it is absent):

  (a) the model alone on preloaded tensors, per runtime (keras, litert)
  (b) decode + preprocess alone (the reader's tf.data pipeline, no model)
  (c) the real CLI end to end (`pipeline label` in a subprocess), per runtime
  (d) the one-image-at-a-time recipe of the Keras blog (PIL load_img, predict one image)
  and the CLI's peak RSS for 1k vs 10k images (the 1000 files listed 10 times; --quick skips it).
  gpufeed (`--only gpufeed` runs it alone): the Keras runtime's bytes per image moved to the
  model and its CLI end to end, float32 feed vs uint8 feed side by side.
  embeddings (`--only embeddings` runs it alone): the CLI with and without --embeddings side by
  side (images/s, Parquet bytes per row), under the "embeddings" key of bench.json.
  int8 (`--only int8` runs it alone): LiteRT float32 vs --precision int8, the model alone
  (also dynamic-range and uint8-I/O variants), the CLI end to end side by side, and top-1/top-5
  on the shared sample with the top-1 agreement.

Photo size (`--only photo-size`, scripts/bench.py `photo_size_section`): the same stages (model
alone, decode alone, CLI end to end, work-conserving bound) on the ImageNet-size JPEGs and on
phone-size ones (240 12 MP JPEGs, 4032x3024 q90, upscaled from the same source photos and cached
under bench-results/ by a hash of the recipe), the phone photos with reduced-scale JPEG decode
(the default) and with --no-scaled-decode, side by side in interleaved rounds.

Formats (`--only formats`, scripts/bench_formats.py): JPEG, HEIC, AVIF and TIFF copies of the
same photos at ImageNet size and at 12 MP, on the CPU decode path side by side: images/s, CPU
ms per image and both as ratios to JPEG.

Prints a table and the targets of issue 5, writes bench-results/bench.json. Not a test: the
numbers depend on the machine and its load, so the load average is recorded with them.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bench_formats  # noqa: E402  (beside this script)
SHARED = ROOT.parent / "shared" / "images" / "imagenet-sample-100"
N_IMAGES = 1000
REPEATS_10K = 10


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from pipeline.tfimport import import_tensorflow_quietly

    import_tensorflow_quietly()
    from pipeline.config import RunConfig

    cfg = RunConfig(cache_dir=args.cache_dir) if args.cache_dir else RunConfig()
    images_dir, source = prepare_images(out / "images-1k", args.images)
    paths = sorted(str(p.resolve()) for p in images_dir.iterdir() if p.suffix == ".jpg")
    assert len(paths) == N_IMAGES, f"expected {N_IMAGES} images in {images_dir}, found {len(paths)}"
    images = {"n": len(paths), "source": source, "dir": str(images_dir)}
    if args.only == "gpufeed":
        return only_section(out, "gpufeed", measure_gpufeed(paths, images_dir, out, cfg),
                            print_gpufeed)
    if args.only == "embeddings":
        return only_section(out, "embeddings", time_embeddings(images_dir, out, cfg),
                            print_embeddings)
    if args.only == "int8":
        return only_section(out, "int8", measure_int8(paths, images_dir, out, cfg), print_int8)
    if args.only == "formats":
        return only_section(out, "formats", formats_section(args, out, cfg, paths),
                            bench_formats.show)
    if args.only == "photo-size":
        return only_section(out, "photo_size",
                            photo_size_section(args, out, cfg, paths, images_dir, images),
                            print_photo_size)
    results: dict = {"machine": machine(), "images": images}
    log(f"machine: {results['machine']['cpu_model']}, {results['machine']['nproc']} cores, "
        f"load average {results['machine']['loadavg_start']}")

    spec, predictors = load_predictors(cfg)
    # Other work on the machine slows some rounds: the stages are measured side by side in
    # every round, and each stage's fastest round is reported (all rounds are in the JSON).
    rounds = []
    for i in range(args.repeat):
        log(f"round {i + 1} of {args.repeat}")
        rounds.append(measure_round(paths, images_dir, out, cfg, spec, predictors))
    results["rounds"] = rounds
    results.update(fastest(rounds))
    n_recipe = 200 if args.quick else len(paths)
    results["one_image_recipe"] = time_recipe(paths[:n_recipe], predictors["keras"]._model, spec)
    if not args.quick:
        manifest = write_10k_manifest(paths, out / "manifest-10k.csv")
        results["cli"]["default_10k"] = time_cli(manifest, out / "out-default-10k", cfg, [])
    results["gpufeed"] = measure_gpufeed(paths, images_dir, out, cfg)
    results["int8"] = measure_int8(paths, images_dir, out, cfg)
    results["machine"]["loadavg_end"] = loadavg()
    results["targets"] = targets(results)
    results["embeddings"] = time_embeddings(images_dir, out, cfg)
    results["photo_size"] = photo_size_section(args, out, cfg, paths, images_dir, images)
    results["formats"] = formats_section(args, out, cfg, paths)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    print_gpufeed(results["gpufeed"])
    print_embeddings(results["embeddings"])
    print_int8(results["int8"])
    print_photo_size(results["photo_size"])
    bench_formats.show(results["formats"])
    log(f"wrote {out / 'bench.json'}")
    return 0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="one round, the recipe on 200 images, no 10k-image RSS run")
    p.add_argument("--repeat", type=int, default=None, help="rounds of (a)-(c) [3; --quick: 1]")
    p.add_argument("--out", default=str(ROOT / "bench-results"))
    p.add_argument("--images", default=str(SHARED), help="source photos to re-encode")
    p.add_argument("--cache-dir", default=None, help="model cache (default: the CLI's)")
    p.add_argument("--only", choices=["gpufeed", "embeddings", "int8", "photo-size", "formats"],
                   default=None,
                   help="run one section alone; its rows replace that key in bench.json")
    p.add_argument("--phone-images", type=int, default=N_PHONE,
                   help=f"12 MP JPEGs of the photo-size section [{N_PHONE}]")
    args = p.parse_args()
    args.repeat = args.repeat or (1 if args.quick else 3)
    return args


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- inputs ----------------------------------------------------------------------------

def prepare_images(dest: Path, source_dir: str) -> tuple[Path, str]:
    """1000 distinct JPEGs: each source photo re-encoded with a slightly different crop and
    quality (so no two files are the same), or generated photos when there is no source."""
    from PIL import Image

    sources = sorted(Path(source_dir).glob("*.JPEG")) if Path(source_dir).is_dir() else []
    kind = f"{len(sources)} photos of {source_dir}, re-encoded" if sources else "generated 500x375"
    marker = dest / ".source"
    if marker.is_file() and marker.read_text() == kind and len(list(dest.glob("*.jpg"))) == N_IMAGES:
        return dest, kind
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.jpg"):
        old.unlink()
    rng = np.random.default_rng(5)
    for i in range(N_IMAGES):
        if sources:
            src = sources[i % len(sources)]
            variant = i // len(sources)
            img = Image.open(src)
            w, h = img.size
            box = (variant % 7, variant % 5, w - variant % 3, h - variant % 4)
            img.crop(box).save(dest / f"{variant:02d}_{src.stem}.jpg", quality=85 + variant % 11)
        else:
            generated_photo(rng).save(dest / f"gen_{i:04d}.jpg", quality=90)
    marker.write_text(kind)
    return dest, kind


def generated_photo(rng, size=(500, 375)):
    """Smooth random colour fields plus sensor-like noise: JPEG size and decode cost of a photo."""
    from PIL import Image

    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(low, np.float32) + rng.normal(0, 14, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_10k_manifest(paths: list[str], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        for r in range(REPEATS_10K):
            for p in paths:
                w.writerow([f"r{r}/{os.path.basename(p)}", p])
    return path


# ---- measurements ----------------------------------------------------------------------

def load_predictors(cfg):
    from pipeline import devices, models, runtime

    spec = models.get(cfg.model_request())
    predictors = {name: runtime.load(spec, devices.plan(cfg.replace(runtime=name).device_request(), []))
                  for name in ("keras", "litert")}
    return spec, predictors


def measure_round(paths, images_dir, out, cfg, spec, predictors) -> dict:
    batches, t_decode = time_decode(paths, spec)
    r = {"decode": rate(len(paths), t_decode),
         "model_alone": {name: rate(len(paths), time_model(p, batches))
                         for name, p in predictors.items()}}
    del batches
    r["cli"] = {name: time_cli(images_dir, out / f"out-{name}", cfg, ["--runtime", name])
                for name in ("keras", "litert")}
    r["cli"]["default"] = time_cli(images_dir, out / "out-default", cfg, [])
    r["loadavg"] = loadavg()
    return r


def fastest(rounds: list[dict]) -> dict:
    """Each stage's fastest round."""
    def best(items):
        return max(items, key=lambda v: v["images_per_second"])

    first = rounds[0]
    return {
        "decode": best([r["decode"] for r in rounds]),
        "model_alone": {k: best([r["model_alone"][k] for r in rounds]) for k in first["model_alone"]},
        "cli": {k: best([r["cli"][k] for r in rounds]) for k in first["cli"]},
    }


def time_decode(paths: list[str], spec, scaled_decode: bool = True) -> tuple[list[np.ndarray], float]:
    """(b): iterate the reader's batches (decode, crop, resize, normalize); keep them for (a)."""
    from pipeline.devices import CPU_BATCH_SIZE
    from pipeline.reader import ImageReader
    from pipeline.sources import local_ref
    from pipeline.types import ReadLimits

    def reader(ps):
        refs = [local_ref(p, Path(p)) for p in ps]
        return ImageReader(refs, spec.preprocess, CPU_BATCH_SIZE,
                           ReadLimits(scaled_decode=scaled_decode))

    for _ in reader(paths[:CPU_BATCH_SIZE]):  # warm-up: graph tracing, thread pools
        pass
    log(f"(b) decode + preprocess alone{'' if scaled_decode else ', --no-scaled-decode'}")
    started = time.perf_counter()
    batches = [b.images for b in reader(paths)]
    elapsed = time.perf_counter() - started
    assert sum(len(b) for b in batches) == len(paths), "some bench images failed to decode"
    return batches, elapsed


def time_model(predictor, batches: list[np.ndarray]) -> float:
    """(a): the predictor alone over the preloaded batches (after one warm-up batch)."""
    log(f"(a) model alone, {predictor.name}")
    predictor.predict(batches[0])
    started = time.perf_counter()
    for b in batches:
        predictor.predict(b)
    return time.perf_counter() - started


# Peak RSS of a child counts what it inherited at fork: a child forked from this (large)
# process would report this process's RSS. So a small Python forks the CLI and reports it.
_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"exit_code": os.waitstatus_to_exitcode(status), "peak_rss_kb": usage.ru_maxrss,
               "cpu_seconds": usage.ru_utime + usage.ru_stime}, f)
"""


def time_cli(input_path: Path, output: Path, cfg, extra: list[str]) -> dict:
    """(c): `pipeline label` in a subprocess on a fresh OUTPUT; its summary, wall and peak RSS."""
    import shutil

    shutil.rmtree(output, ignore_errors=True)
    log(f"(c) CLI end to end {' '.join(extra) or '(defaults)'} on {input_path.name}")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "pipeline", "label", str(input_path), str(output), "--json",
           "--progress", "none", "--cache-dir", cfg.cache_dir, *extra]
    with tempfile.NamedTemporaryFile("r") as usage:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, usage.name, *cmd], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        child = json.load(usage)
    if proc.returncode != 0 or child["exit_code"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({child['exit_code']}):\n{proc.stderr}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    n = summary["labeled"] + summary["errors"]
    return {"command": " ".join(["pipeline", *cmd[3:]]), "images": n, "errors": summary["errors"],
            "run_seconds": summary["wall_seconds"], "images_per_second": summary["images_per_second"],
            "process_seconds": wall, "process_images_per_second": n / wall,
            "peak_rss_mb": child["peak_rss_kb"] / 1024,
            # CPU time of the whole process (start-up included): on a busy shared machine a
            # steadier comparison of two settings than images/s
            "cpu_ms_per_image": 1000 * child["cpu_seconds"] / n}


EMBEDDINGS_ROUNDS = 2


def time_embeddings(images_dir: Path, out: Path, cfg, rounds: int = EMBEDDINGS_ROUNDS) -> dict:
    """(e): the default CLI with and without --embeddings, alternating, fastest round of each;
    Parquet bytes per row from the parts each wrote. A 10-image --embeddings run first, so the
    two-output flatbuffer's one-time conversion is not timed."""
    import pyarrow.parquet as pq

    warm = out / "images-warmup"
    warm.mkdir(exist_ok=True)
    for p in sorted(images_dir.iterdir())[:10]:
        if not (warm / p.name).exists():
            (warm / p.name).symlink_to(p)
    time_cli(warm, out / "out-embeddings-warmup", cfg, ["--embeddings"])
    runs: dict[str, list[dict]] = {"labels_only": [], "with_embeddings": []}
    for _ in range(rounds):
        for key, extra in (("labels_only", []), ("with_embeddings", ["--embeddings"])):
            output = out / f"out-{key}"
            r = time_cli(images_dir, output, cfg, extra)
            parts = sorted(output.glob("part-*.parquet"))
            rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
            r["parquet_bytes_per_row"] = sum(p.stat().st_size for p in parts) / rows
            runs[key].append(r)
    best = {k: max(v, key=lambda r: r["images_per_second"]) for k, v in runs.items()}
    return {"loadavg": loadavg(), "rounds": runs, **best,
            "speed_ratio": best["with_embeddings"]["images_per_second"]
            / best["labels_only"]["images_per_second"]}


def print_embeddings(e: dict) -> None:
    print("\n(e) embeddings          images/s   Parquet bytes/row")
    for key in ("labels_only", "with_embeddings"):
        r = e[key]
        print(f"    {key:<18} {r['images_per_second']:>9.1f}   {r['parquet_bytes_per_row']:>10.0f}")
    print(f"    with / without: {e['speed_ratio']:.2f}x speed")


def time_recipe(paths: list[str], model, spec) -> dict:
    """(d): the Keras blog's recipe, one image at a time: PIL load_img at 224x224 (a squash, no
    crop), img_to_array, expand_dims, preprocess, model.predict. The blog used InceptionResNetV2,
    whose weights cannot be downloaded here, so the same embedded model stands in for it."""
    import keras

    pre = spec.preprocess
    mean, std = np.array(pre.mean, np.float32), np.array(pre.std, np.float32)

    def one(path):
        img = keras.utils.load_img(path, target_size=(pre.size, pre.size))
        x = np.expand_dims(keras.utils.img_to_array(img), axis=0)
        return model.predict((x - mean) / std, verbose=0)

    one(paths[0])
    log(f"(d) one-image recipe on {len(paths)} images")
    started = time.perf_counter()
    for p in paths:
        one(p)
    r = rate(len(paths), time.perf_counter() - started)
    r["note"] = ("Keras blog recipe (PIL load_img, predict one image) with the embedded "
                 "EfficientNet-Lite0: InceptionResNetV2 weights cannot be downloaded here")
    return r


def formats_section(args, out: Path, cfg, paths: list[str]) -> dict:
    """scripts/bench_formats.py: JPEG, HEIC, AVIF, TIFF side by side on the CPU decode path."""
    from pipeline import models

    phone_dir, _ = prepare_phone_images(out, args.images, bench_formats.N_PHONE)
    phone = sorted(str(p) for p in phone_dir.glob("*.jpg"))
    return bench_formats.section(paths, phone, out, models.get(cfg.model_request()), args.repeat,
                                 log, loadavg)


def only_section(out: Path, key: str, section: dict, show) -> int:
    """A section run alone (`--only KEY`): its result replaces bench.json[KEY], the rest stays."""
    path = out / "bench.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[key] = section
    path.write_text(json.dumps(results, indent=2))
    show(section)
    log(f"wrote {path} [{key}]")
    return 0


# ---- gpufeed: what the Keras runtime is handed ------------------------------------------

GPUFEED_ROUNDS = 2


def measure_gpufeed(paths, images_dir, out, cfg) -> dict:
    """Bytes per image the reader hands the Keras model (the reader's real batches), and the
    Keras CLI end to end with each feed, alternated over GPUFEED_ROUNDS rounds (fastest kept)."""
    from pipeline import devices, models, runtime
    from pipeline.reader import ImageReader
    from pipeline.sources import local_ref
    from pipeline.types import Feed

    spec = models.get(cfg.model_request())
    keras_feed = runtime.load(spec, devices.plan(cfg.replace(runtime="keras").device_request(), [])).feed
    refs = [local_ref(p, Path(p)) for p in paths[:64]]
    section = {"model": spec.name, "input": f"{spec.input_size}x{spec.input_size}x3",
               "auto_feed_keras": keras_feed.dtype, "bytes_per_image": {}, "cli": {}}
    for feed in ("float32", "uint8"):
        batch = next(iter(ImageReader(refs, spec.preprocess, len(refs), feed=Feed(feed))))
        section["bytes_per_image"][feed] = batch.images.nbytes // len(batch.images)
    rounds = []
    for i in range(GPUFEED_ROUNDS):
        log(f"gpufeed round {i + 1} of {GPUFEED_ROUNDS}")
        rounds.append({feed: time_cli(images_dir, out / f"out-keras-{feed}", cfg,
                                      ["--runtime", "keras", "--feed", feed])
                       for feed in ("float32", "uint8")})
    section["rounds"] = rounds
    section["cli"] = {feed: max((r[feed] for r in rounds), key=lambda v: v["images_per_second"])
                      for feed in ("float32", "uint8")}
    section["loadavg"] = loadavg()
    return section


def print_gpufeed(g: dict) -> None:
    b, cli = g["bytes_per_image"], g["cli"]
    print(f"\ngpufeed: what the Keras runtime is handed ({g['model']}, input {g['input']}; "
          f"auto feed on keras: {g['auto_feed_keras']}; fastest of {len(g['rounds'])} rounds, "
          f"load average {g['loadavg']})")
    print(f"{'feed':10} {'bytes/image':>12} {'CLI images/s':>13} {'process/s':>10}")
    for feed in ("float32", "uint8"):
        print(f"{feed:10} {b[feed]:12,d} {cli[feed]['images_per_second']:13.1f} "
              f"{cli[feed]['process_images_per_second']:10.1f}")
    print(f"uint8 vs float32: {b['float32'] / b['uint8']:.1f}x fewer bytes per image, end to end "
          f"{cli['uint8']['images_per_second'] / cli['float32']['images_per_second']:.2f}x")


# ---- int8: LiteRT full-integer vs float32 ----------------------------------------------

INT8_ROUNDS = 2
INT8_MODEL_IMAGES = 400


def measure_int8(paths, images_dir, out, cfg) -> dict:
    """LiteRT float32 vs int8: the model alone on the reader's batches (wall and CPU time per
    image, so a loaded machine still compares them fairly), the CLI end to end, alternated over
    INT8_ROUNDS rounds (fastest kept); accuracy on the shared sample when present."""
    from pipeline import models, runtime

    spec = models.get(cfg.model_request())
    predictors = {p: runtime.load_litert(spec, cfg.cache_dir, precision=p) for p in ("float32", "int8")}
    predictors.update(int8_variants(spec, out))
    batches, _ = time_decode(paths[:INT8_MODEL_IMAGES], spec)
    section = {"model": spec.name, "rounds": []}
    for i in range(INT8_ROUNDS):
        log(f"int8 round {i + 1} of {INT8_ROUNDS}")
        r = {"model_alone": {name: time_model_cpu(p, batches) for name, p in predictors.items()}}
        r["cli"] = {p: time_cli(images_dir, out / f"out-litert-{p}", cfg,
                                ["--runtime", "litert", "--precision", p]) for p in ("float32", "int8")}
        section["rounds"].append(r)
    best = lambda items: max(items, key=lambda v: v["images_per_second"])  # noqa: E731
    section["model_alone"] = {k: best([r["model_alone"][k] for r in section["rounds"]])
                              for k in predictors}
    section["cli"] = {k: best([r["cli"][k] for r in section["rounds"]]) for k in ("float32", "int8")}
    if SHARED.is_dir():
        section["accuracy"] = int8_accuracy(spec, predictors["float32"], predictors["int8"])
    section["loadavg"] = loadavg()
    return section


def int8_variants(spec, out: Path) -> dict:
    """The quantizations not chosen, for the model-alone comparison: dynamic-range (int8
    weights, float activations) and full-integer with uint8 input/output. Cached in OUT."""
    import tensorflow as tf

    from pipeline import quantize, runtime
    from pipeline.tfimport import muted_output

    def dynamic_range(converter):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def uint8_io(converter):
        images = quantize.calibration_images(spec.preprocess)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[None]] for x in images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.uint8

    variants = {}
    for name, configure in (("dynamic_range", dynamic_range), ("int8_uint8_io", uint8_io)):
        path = out / f"{spec.name}-{spec.weights_sha256[:16]}-tf{tf.__version__}-{name}.tflite"
        if not path.is_file():
            log(f"int8: converting the {name} variant (once; cached in {path})")
            converter = tf.lite.TFLiteConverter.from_keras_model(spec.load_keras())
            configure(converter)
            with muted_output(stdout=True):
                path.write_bytes(converter.convert())
        flatbuffer = path.read_bytes()
        variants[name] = (_Uint8IO(flatbuffer) if name == "int8_uint8_io"
                          else runtime.LiteRTPredictor(flatbuffer))
    return variants


class _Uint8IO:
    """LiteRT with uint8 input and output, one image per invoke like LiteRTPredictor: the float
    input is quantized and the output dequantized around it, as a caller would have to."""

    name = "litert"

    def __init__(self, flatbuffer: bytes):
        from pipeline import devices, runtime

        self._it = runtime._make_interpreter(flatbuffer, devices.cpu_threads())
        self._in, self._out = self._it.get_input_details()[0], self._it.get_output_details()[0]
        self._allocated = False

    def predict(self, images):
        if not self._allocated:
            self._it.resize_tensor_input(self._in["index"], (1, *images.shape[1:]))
            self._it.allocate_tensors()
            self._allocated = True
        (in_scale, in_zero), (out_scale, out_zero) = self._in["quantization"], self._out["quantization"]
        probs = []
        for image in images:
            q = np.clip(np.round(image / in_scale + in_zero), 0, 255).astype(np.uint8)
            self._it.set_tensor(self._in["index"], q[None])
            self._it.invoke()
            probs.append((self._it.get_tensor(self._out["index"])[0].astype(np.float32) - out_zero) * out_scale)
        return np.array(probs)


def time_model_cpu(predictor, batches) -> dict:
    """time_model, plus the process CPU time per image (both cores count)."""
    cpu = time.process_time()
    seconds = time_model(predictor, batches)
    r = rate(sum(len(b) for b in batches), seconds)
    r["cpu_ms_per_image"] = (time.process_time() - cpu) * 1000 / r["images"]
    return r


def int8_accuracy(spec, float32, int8) -> dict:
    """Top-1/top-5 on the shared sample (true class = the file name's wnid) and agreement."""
    from pipeline import runtime
    from pipeline.reader import ImageReader
    from pipeline.sources import iter_refs

    batches = list(ImageReader(iter_refs(str(SHARED)), spec.preprocess, 64))
    truth = [r.image_id.split("_")[0] for b in batches for r in b.refs]
    images = np.concatenate([b.images for b in batches])
    labels = np.array(spec.labels.ids)
    top5 = {name: runtime.top_k(p.predict(images), 5)[0]
            for name, p in (("float32", float32), ("int8", int8))}
    r = {name: {"top1": float(np.mean(labels[t[:, 0]] == truth)),
                "top5": float(np.mean([w in labels[row] for w, row in zip(truth, t)]))}
         for name, t in top5.items()}
    r["images"] = len(truth)
    r["top1_agreement"] = float(np.mean(top5["float32"][:, 0] == top5["int8"][:, 0]))
    r["top5_overlap"] = float(np.mean([len(set(a) & set(b)) / 5
                                       for a, b in zip(top5["float32"], top5["int8"])]))
    return r


def print_int8(g: dict) -> None:
    m, cli = g["model_alone"], g["cli"]
    print(f"\nint8: LiteRT float32 vs --precision int8 ({g['model']}; fastest of "
          f"{len(g['rounds'])} rounds, load average {g['loadavg']})")
    print(f"{'':40} {'images/s':>9} {'CPU ms/image':>13}")
    for name in m:
        print(f"{'model alone, ' + name:40} {m[name]['images_per_second']:9.1f} "
              f"{m[name]['cpu_ms_per_image']:13.2f}")
    for name in ("float32", "int8"):
        print(f"{'CLI end to end, --precision ' + name:40} {cli[name]['images_per_second']:9.1f}")
    print(f"int8 vs float32: model alone {m['int8']['images_per_second'] / m['float32']['images_per_second']:.2f}x "
          f"({m['float32']['cpu_ms_per_image'] / m['int8']['cpu_ms_per_image']:.2f}x less CPU), "
          f"end to end {cli['int8']['images_per_second'] / cli['float32']['images_per_second']:.2f}x "
          "(default if >= 1.3x and top-1 drops <= 0.5 points)")
    if "accuracy" in g:
        a = g["accuracy"]
        print(f"shared sample ({a['images']} photos): float32 top-1 {a['float32']['top1']:.2f} "
              f"top-5 {a['float32']['top5']:.2f}; int8 top-1 {a['int8']['top1']:.2f} top-5 "
              f"{a['int8']['top5']:.2f}; top-1 agreement {a['top1_agreement']:.2f}, top-5 "
              f"overlap {a['top5_overlap']:.2f}")


def rate(n: int, seconds: float) -> dict:
    return {"images": n, "seconds": seconds, "images_per_second": n / seconds}


# ---- photo size: ImageNet-size vs 12 MP, scaled vs full decode (issue 16) -------------

N_PHONE = 240
PHONE_SIZE = (4032, 3024)  # 12 MP, landscape; portrait sources become 3024x4032
PHONE_QUALITY = 90


def photo_size_section(args, out: Path, cfg, paths: list[str], images_dir: Path,
                       images: dict) -> dict:
    """The stages on both photo sizes, the phone photos decoded at reduced scale (default) and
    at full scale, in interleaved rounds (the order of the two phone CLI runs alternates)."""
    from pipeline import devices, models, runtime

    phone_dir, phone_source = prepare_phone_images(out, args.images, args.phone_images)
    phone = sorted(str(p.resolve()) for p in phone_dir.glob("*.jpg"))
    spec = models.get(cfg.model_request())
    predictor = runtime.load(spec, devices.plan(cfg.replace(runtime=DEFAULT_RUNTIME).device_request(), []))
    log(f"photo size: {len(paths)} ImageNet-size and {len(phone)} 12 MP JPEGs, "
        f"load average {loadavg()}")
    rounds = []
    for i in range(args.repeat):
        log(f"photo size: round {i + 1} of {args.repeat}")
        r = {"imagenet": _size_stages(paths, images_dir, out / "out-size-imagenet", cfg, spec,
                                      predictor, [True])}
        r["phone"] = _size_stages(phone, phone_dir, out / "out-size-phone", cfg, spec, predictor,
                                  [True, False] if i % 2 == 0 else [False, True])
        r["loadavg"] = loadavg()
        rounds.append(r)
    fastest = _fastest_sizes(rounds)
    return {"images": {"imagenet": images, "phone": {"n": len(phone), "source": phone_source,
                                                      "dir": str(phone_dir)}},
            "rounds": rounds, "fastest": fastest, "ratios": _size_ratios(rounds),
            "dct_scales": time_dct_scales(phone[:DCT_SCALE_IMAGES], spec,
                                          fastest["phone"]["model_alone"]),
            "loadavg_end": loadavg()}


DCT_SCALE_IMAGES = 30


def time_dct_scales(paths: list[str], spec, model_alone: dict) -> dict:
    """One thread, each DCT scale 1/r: ms per image to decode the center crop (eager
    decode_and_crop_jpeg, the best of 3 passes), and the end-to-end ceiling of that scale vs
    full scale if libjpeg and the model were all the work: (t_1 + m) / (t_r + m), m the model's
    CPU ms per image (all cores busy for model alone's time)."""
    import tensorflow as tf

    from pipeline.reader import geometry

    pre = spec.preprocess
    data = [Path(p).read_bytes() for p in paths]
    windows = []
    for d in data:
        h, w = (int(x) for x in tf.io.extract_jpeg_shape(d)[:2])
        windows.append([int(x) for x in geometry.crop_window(h, w, pre.crop_fraction)])
    log(f"one thread: {len(paths)} 12 MP crops at each DCT scale")
    ms = {}
    for r in (1, 2, 4, 8):
        passes = []
        for _ in range(3):
            started = time.perf_counter()
            for d, (top, left, h, w) in zip(data, windows):
                tf.io.decode_and_crop_jpeg(d, geometry.enclosing_window(top, left, h, w, r),
                                           channels=3, ratio=r)
            passes.append(time.perf_counter() - started)
        ms[r] = 1000 * min(passes) / len(paths)
    cores = len(os.sched_getaffinity(0))
    model_ms = 1000 * cores * model_alone["seconds"] / model_alone["images"]
    return {"images": len(paths), "ms_per_image": {f"1/{r}": v for r, v in ms.items()},
            "model_cpu_ms_per_image": model_ms, "cores": cores,
            "ceiling_vs_full": {f"1/{r}": (ms[1] + model_ms) / (v + model_ms)
                                for r, v in ms.items()}}


def _size_stages(paths, input_dir: Path, output: Path, cfg, spec, predictor,
                 scaled_order: list[bool]) -> dict:
    """One round of one photo size: decode alone and CLI per decode setting, model alone once."""
    r: dict = {"decode": {}, "cli": {}}
    for scaled in scaled_order:
        key = _decode_key(scaled)
        batches, seconds = time_decode(paths, spec, scaled)
        r["decode"][key] = rate(len(paths), seconds)
        if "model_alone" not in r:
            r["model_alone"] = rate(len(paths), time_model(predictor, batches))
        del batches
        r["cli"][key] = time_cli(input_dir, output, cfg, [] if scaled else ["--no-scaled-decode"])
    for key, d in r["decode"].items():
        r.setdefault("bound", {})[key] = len(paths) / (r["model_alone"]["seconds"] + d["seconds"])
        libjpeg = rate(len(paths), time_jpeg_decode_only(paths, spec, key == "scaled"))
        r.setdefault("libjpeg", {})[key] = libjpeg
        r.setdefault("ceiling", {})[key] = len(paths) / (r["model_alone"]["seconds"]
                                                         + libjpeg["seconds"])
    return r


def time_jpeg_decode_only(paths: list[str], spec, scaled: bool) -> float:
    """(b0): libjpeg's decode + crop alone, as the reader calls it (same window, same DCT scale),
    on all cores, from bytes already in memory: no read, hash, checks, resize or normalization.
    Model alone + this is the end-to-end speed's ceiling if everything else cost nothing."""
    import tensorflow as tf

    from pipeline import imageinfo
    from pipeline.reader import geometry
    from pipeline.reader.decode import decode_crop

    pre = spec.preprocess
    target = geometry.scaled_target(pre.size) if scaled else None

    def decode(data):
        h, w = tf.unstack(tf.io.extract_jpeg_shape(data)[:2])
        crop, _, _, _ = decode_crop(
            data, tf.constant(imageinfo.FORMAT_CODES["jpeg"]), w, h, tf.constant(1),
            lambda height, width, o: geometry.crop_window(height, width, pre.crop_fraction, o),
            target)
        return crop[0, 0]  # the decode runs whole; only 3 bytes leave the graph

    data = [Path(p).read_bytes() for p in paths]
    dataset = (tf.data.Dataset.from_tensor_slices(data)
               .map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(64))
    for _ in dataset.take(1):  # warm-up: tracing, thread pools
        pass
    log(f"(b0) libjpeg decode + crop alone{'' if scaled else ', --no-scaled-decode'}")
    started = time.perf_counter()
    for _ in dataset:
        pass
    return time.perf_counter() - started


def _decode_key(scaled: bool) -> str:
    return "scaled" if scaled else "full"


def _fastest_sizes(rounds: list[dict]) -> dict:
    def best(items):
        return max(items, key=lambda v: v["images_per_second"])

    out = {}
    for size in ("imagenet", "phone"):
        rs = [r[size] for r in rounds]
        out[size] = {"model_alone": best([r["model_alone"] for r in rs]),
                     "decode": {k: best([r["decode"][k] for r in rs]) for k in rs[0]["decode"]},
                     "cli": {k: best([r["cli"][k] for r in rs]) for k in rs[0]["cli"]},
                     "bound": {k: max(r["bound"][k] for r in rs) for k in rs[0]["bound"]},
                     "libjpeg": {k: best([r["libjpeg"][k] for r in rs]) for k in rs[0]["libjpeg"]},
                     "ceiling": {k: max(r["ceiling"][k] for r in rs) for k in rs[0]["ceiling"]}}
    return out


def _size_ratios(rounds: list[dict]) -> dict:
    """Ratios round by round (each from the same round, so load drifts cancel) and their median."""
    def per_round(f):
        values = [f(r) for r in rounds]
        return {"median": float(np.median(values)), "rounds": values}

    def cli(r, size, key="scaled"):
        return r[size]["cli"][key]["images_per_second"]

    return {
        "phone_cli_scaled_vs_full": per_round(lambda r: cli(r, "phone") / cli(r, "phone", "full")),
        "phone_cli_cpu_full_vs_scaled": per_round(
            lambda r: r["phone"]["cli"]["full"]["cpu_ms_per_image"]
            / r["phone"]["cli"]["scaled"]["cpu_ms_per_image"]),
        "phone_ceiling_scaled_vs_full": per_round(
            lambda r: r["phone"]["ceiling"]["scaled"] / r["phone"]["ceiling"]["full"]),
        "phone_libjpeg_scaled_vs_full": per_round(
            lambda r: r["phone"]["libjpeg"]["full"]["seconds"]
            / r["phone"]["libjpeg"]["scaled"]["seconds"]),
        "phone_decode_scaled_vs_full": per_round(
            lambda r: r["phone"]["decode"]["full"]["seconds"] / r["phone"]["decode"]["scaled"]["seconds"]),
        "phone_vs_imagenet_cli_scaled": per_round(lambda r: cli(r, "phone") / cli(r, "imagenet")),
        "phone_vs_imagenet_cli_full": per_round(
            lambda r: cli(r, "phone", "full") / cli(r, "imagenet")),
        "imagenet_cli_vs_bound": per_round(
            lambda r: cli(r, "imagenet") / r["imagenet"]["bound"]["scaled"]),
        "phone_cli_vs_bound_scaled": per_round(
            lambda r: cli(r, "phone") / r["phone"]["bound"]["scaled"]),
        "phone_cli_vs_bound_full": per_round(
            lambda r: cli(r, "phone", "full") / r["phone"]["bound"]["full"]),
    }


def prepare_phone_images(out: Path, source_dir: str, n: int) -> tuple[Path, str]:
    """`n` 12 MP JPEGs (q90): the bench's source photos, each cropped as prepare_images does,
    upscaled (bicubic) to 4032x3024 or 3024x4032. Cached in a directory named by a hash of the
    recipe (sources, count, size, quality), so a changed recipe never reuses stale files."""
    import hashlib

    from PIL import Image

    sources = sorted(Path(source_dir).glob("*.JPEG")) if Path(source_dir).is_dir() else []
    recipe = json.dumps({"n": n, "size": PHONE_SIZE, "quality": PHONE_QUALITY, "version": 1,
                         "sources": [(p.name, p.stat().st_size) for p in sources]})
    dest = out / f"images-12mp-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    kind = (f"{len(sources)} photos of {source_dir}, upscaled to 12 MP" if sources
            else "generated, 12 MP")
    if (dest / ".done").is_file() and len(list(dest.glob("*.jpg"))) == n:
        return dest, kind
    log(f"writing {n} 12 MP JPEGs to {dest} (once)")
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(12)
    for i in range(n):
        if sources:
            src, variant = sources[i % len(sources)], i // len(sources)
            img = Image.open(src).convert("RGB")
            w, h = img.size
            img = img.crop((variant % 7, variant % 5, w - variant % 3, h - variant % 4))
            name = f"{variant:02d}_{src.stem}.jpg"
        else:
            img, w, h, name = generated_photo(rng), 500, 375, f"gen_{i:04d}.jpg"
        size = PHONE_SIZE if w >= h else PHONE_SIZE[::-1]
        img.resize(size, Image.BICUBIC).save(dest / name, quality=PHONE_QUALITY)
    (dest / ".done").write_text(recipe)
    return dest, kind


def print_photo_size(r: dict) -> None:
    f, ratios = r["fastest"], r["ratios"]
    im, ph = r["images"]["imagenet"], r["images"]["phone"]
    print(f"\nPhoto size: {im['n']} ImageNet-size JPEGs ({im['source']}) vs {ph['n']} phone-size "
          f"JPEGs ({ph['source']}, {PHONE_SIZE[0]}x{PHONE_SIZE[1]} q{PHONE_QUALITY}); fastest of "
          f"{len(r['rounds'])} interleaved rounds; load average per round "
          f"{', '.join(x['loadavg'] for x in r['rounds'])}")
    print(f"{'stage':48} {'images/s':>9} {'process/s':>9} {'peak RSS':>9}")
    for size, label in (("imagenet", "ImageNet"), ("phone", "12 MP")):
        rows = [(f"{label} (a) model alone, {DEFAULT_RUNTIME}", f[size]["model_alone"])]
        for key in f[size]["libjpeg"]:
            flag = "defaults" if key == "scaled" else "--no-scaled-decode"
            rows.append((f"{label} (b0) libjpeg decode+crop only, {flag}", f[size]["libjpeg"][key]))
        for key in f[size]["decode"]:
            flag = "defaults" if key == "scaled" else "--no-scaled-decode"
            rows.append((f"{label} (b) decode alone, {flag}", f[size]["decode"][key]))
        for key in f[size]["cli"]:
            flag = "defaults" if key == "scaled" else "--no-scaled-decode"
            rows.append((f"{label} (c) CLI, {flag}", f[size]["cli"][key]))
        for name, v in rows:
            proc = (f"{v['process_images_per_second']:9.1f}" if "process_images_per_second" in v
                    else " " * 9)
            rss = f"{v['peak_rss_mb']:7.0f}MB" if "peak_rss_mb" in v else ""
            print(f"{name:48} {v['images_per_second']:9.1f} {proc} {rss:>9}")
        for key in f[size]["cli"]:
            flag = "defaults" if key == "scaled" else "--no-scaled-decode"
            cpu = min(x[size]["cli"][key]["cpu_ms_per_image"] for x in r["rounds"])
            print(f"{label + ' (c) CLI CPU ms per image, ' + flag:48} {cpu:9.1f}")
        for key, bound in f[size]["bound"].items():
            flag = "defaults" if key == "scaled" else "--no-scaled-decode"
            print(f"{label + ' work-conserving bound, ' + flag:48} {bound:9.1f}")
        for key, ceiling in f[size]["ceiling"].items():
            flag = "defaults" if key == "scaled" else "--no-scaled-decode"
            print(f"{label + ' ceiling (a)+(b0) only, ' + flag:48} {ceiling:9.1f}")
    print("ratios (median of the rounds' own ratios; each round's in bench.json):")
    for key, v in ratios.items():
        target = ("  (target >= 1.4)" if key in ("phone_cli_scaled_vs_full",
                                                 "phone_cli_cpu_full_vs_scaled") else "")
        print(f"  {key:36} {v['median']:6.2f}  rounds {', '.join(f'{x:.2f}' for x in v['rounds'])}"
              f"{target}")
    d = r["dct_scales"]
    print(f"one thread, {d['images']} 12 MP center crops: ms per image at each DCT scale, and the "
          f"end-to-end ceiling vs full scale with {d['model_cpu_ms_per_image']:.1f} CPU ms of "
          f"model per image ({d['cores']} cores)")
    for scale, ms in d["ms_per_image"].items():
        print(f"  {scale:4} {ms:6.1f} ms   ceiling vs 1/1 {d['ceiling_vs_full'][scale]:.2f}x")


# ---- report ----------------------------------------------------------------------------

def machine() -> dict:
    import tensorflow as tf

    try:
        from importlib.metadata import version

        litert = version("ai-edge-litert")
    except Exception:
        litert = "not installed (tf.lite.Interpreter)"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version(),
            "tensorflow": tf.__version__, "ai_edge_litert": litert,
            "loadavg_start": loadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


DEFAULT_RUNTIME = "litert"  # what `auto` picks on a host without a GPU


def round_bound(r: dict, n: int) -> float:
    """N / (T_model_alone + T_decode_alone): decode and model share the same cores."""
    return n / (r["model_alone"][DEFAULT_RUNTIME]["seconds"] + r["decode"]["seconds"])


def targets(r: dict) -> dict:
    cli, n = r["cli"], r["images"]["n"]
    default = cli["default"]["images_per_second"]
    bound = round_bound(r, n)
    t = {
        "default_vs_keras_cli": (default / cli["keras"]["images_per_second"], 2.2),
        "default_vs_one_image_recipe": (default / r["one_image_recipe"]["images_per_second"], 12.0),
        "default_vs_work_conserving_bound": (default / bound, 0.9),
    }
    out = {k: {"ratio": v, "target": goal, "met": v >= goal} for k, (v, goal) in t.items()}
    out["work_conserving_bound_images_per_second"] = bound
    if "default_10k" in cli:
        ratio = cli["default_10k"]["peak_rss_mb"] / cli["default"]["peak_rss_mb"]
        out["peak_rss_10k_vs_1k"] = {"ratio": ratio, "target": 1.2, "met": ratio <= 1.2}
    return out


def print_table(r: dict) -> None:
    m, n = r["machine"], r["images"]["n"]
    rows = [
        ("(a) model alone, keras (preloaded tensors)", r["model_alone"]["keras"]),
        ("(a) model alone, litert", r["model_alone"]["litert"]),
        ("(b) decode + preprocess alone", r["decode"]),
        ("(c) CLI end to end, --runtime keras", r["cli"]["keras"]),
        ("(c) CLI end to end, --runtime litert", r["cli"]["litert"]),
        ("(c) CLI end to end, defaults (auto = litert)", r["cli"]["default"]),
        ("(d) one-image recipe (PIL, predict one)", r["one_image_recipe"]),
    ]
    if "default_10k" in r["cli"]:
        rows.append(("(c) CLI end to end, defaults, 10k images", r["cli"]["default_10k"]))
    print(f"\n{n} JPEGs ({r['images']['source']}); {m['cpu_model']}, {m['nproc']} cores; "
          f"TF {m['tensorflow']}, ai-edge-litert {m['ai_edge_litert']}; "
          f"load average {m['loadavg_start']} (start) / {m['loadavg_end']} (end); "
          f"(a)-(c): fastest of {len(r['rounds'])} rounds")
    print(f"{'stage':48} {'images/s':>9} {'process/s':>9} {'peak RSS':>9}")
    for name, v in rows:
        proc = f"{v['process_images_per_second']:9.1f}" if "process_images_per_second" in v else " " * 9
        rss = f"{v['peak_rss_mb']:7.0f}MB" if "peak_rss_mb" in v else ""
        print(f"{name:48} {v['images_per_second']:9.1f} {proc} {rss:>9}")
    print("(CLI images/s = the run's own summary, from start of `label` incl. model load; "
          "process/s also counts Python and TensorFlow start-up)")
    per_round = [f"{x['cli']['default']['images_per_second'] / round_bound(x, n):.2f} (load {x['loadavg']})"
                 for x in r["rounds"]]
    print(f"default vs its bound, round by round: {', '.join(per_round)}")
    t = r["targets"]
    print(f"work-conserving bound N/(T_model_litert + T_decode): "
          f"{t['work_conserving_bound_images_per_second']:.1f} images/s")
    for key, v in t.items():
        if isinstance(v, dict):
            sign = "<=" if key.startswith("peak_rss") else ">="
            print(f"  {key:36} {v['ratio']:6.2f}  (target {sign} {v['target']})  "
                  f"{'met' if v['met'] else 'NOT MET'}")


if __name__ == "__main__":
    sys.exit(main())
