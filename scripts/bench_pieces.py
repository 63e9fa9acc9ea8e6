"""`make bench` section "pieces" (`python scripts/bench.py --only pieces`): where the decode
stage's CPU goes, piece by piece, and how close the CLI gets to libjpeg + the model.

For the ImageNet-size JPEGs and the 12 MP ones (DCT-scaled decode on, the default), in
interleaved rounds, all as process CPU time per image (steady under load, unlike images/s):

- cumulative tf.data pipelines built from the reader's own functions, each adding one piece:
  sequencing (refs into tf.data), read, sha256, inspect + plan, decode + crop + cut check,
  resize, orientation + normalize, batches to numpy (the reader's real graph), then the real
  ImageReader; a piece's cost is its pipeline's minus the previous one's;
- the Python pieces alone on one thread (imageinfo's inspect, the geometry plan), libjpeg's
  decode + crop alone from memory (b0), and the model hand-off (LiteRT input copy);
- model alone (LiteRT, preloaded batches), the CLI end to end (images/s; CPU per image of the
  whole process, and beyond its start-up, measured on a 1-image input);
- issue 25's targets: CLI >= 0.9x (ImageNet-size) and >= 0.8x (12 MP) the ceiling
  1/(T_model + T_libjpeg); CLI CPU per image <= T_model + T_libjpeg + 2 ms;
- the contract any speed-up keeps: top-1/top-5 of the CLI's labels on the shared sample, its
  photos as they are and upscaled to 12 MP (scripts/sample_accuracy.py, as the tests count).

Each piece's minimum over the rounds is reported; every round is in bench.json.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

import bench
import sample_accuracy

# Rows of the per-piece table: (key, label); a cumulative pipeline per key, in this order.
CUMULATIVE = (
    ("sequencing", "sequencing: refs into tf.data (chunks of inputs)"),
    ("read", "read (bounded, local file; per chunk)"),
    ("sha256", "sha256 of the bytes read"),
    ("inspect_plan", "inspect + plan (one Python call per chunk)"),
    ("decode_crop", "decode + crop + cut check"),
    ("resize", "resize (bicubic, from the window's box)"),
    ("orient_normalize", "orientation + normalize"),
    ("batches", "batching, images to numpy (the reader's graph)"),
    ("reader", "ImageReader's Python (settle, sha hex, Batch)"),
)


def pieces_section(args, out: Path, cfg, paths: list[str], images_dir: Path, images: dict) -> dict:
    from pipeline import devices, models, runtime

    phone_dir, phone_source = bench.prepare_phone_images(out, args.images, args.phone_images)
    phone = sorted(str(p.resolve()) for p in phone_dir.glob("*.jpg"))
    spec = models.get(cfg.model_request())
    predictor = runtime.load(spec, devices.plan(cfg.replace(runtime=bench.DEFAULT_RUNTIME).device_request(), []))
    one = _one_image_dir(out / "images-one", paths[0])
    sizes = {"imagenet": (paths, images_dir), "phone": (phone, phone_dir)}
    bench.log(f"pieces: {len(paths)} ImageNet-size and {len(phone)} 12 MP JPEGs, "
              f"load average {bench.loadavg()}")
    rounds = []
    for i in range(args.repeat):
        bench.log(f"pieces: round {i + 1} of {args.repeat}")
        r: dict = {"cli_startup": bench.time_cli(one, out / "out-pieces-one", cfg, [])}
        for size, (ps, directory) in sizes.items():
            r[size] = _size_round(ps, directory, out / f"out-pieces-{size}", cfg, spec, predictor)
        r["loadavg"] = bench.loadavg()
        rounds.append(r)
    best = {size: _fastest(rounds, size) for size in sizes}
    accuracy = _accuracy(out, cfg)
    startup = min(x["cli_startup"]["cpu_ms_per_image"] for x in rounds) / 1000
    for size, (ps, _) in sizes.items():
        best[size]["cli_cpu_ms_beyond_startup"] = (
            best[size]["cli"]["cpu_ms_per_image"] - 1000 * startup / len(ps))
    return {"images": {"imagenet": images, "phone": {"n": len(phone), "source": phone_source,
                                                      "dir": str(phone_dir)}},
            "rounds": rounds, "fastest": best, "cli_startup_cpu_seconds": startup,
            "targets": _targets(best), "accuracy": accuracy, "loadavg_end": bench.loadavg()}


def _accuracy(out: Path, cfg) -> dict | None:
    """Top-1/top-5 of the CLI's labels on the shared sample: its 100 photos as they are (a CLI
    run of their own) and at 12 MP (the last round's CLI output on the 12 MP copies, the rows of
    variant 00: the 100 photos upscaled whole, as tests/test_scaled_decode.py makes them)."""
    if not bench.SHARED.is_dir():
        return None
    output = out / "out-pieces-accuracy"
    bench.time_cli(bench.SHARED, output, cfg, [])
    return {"imagenet": sample_accuracy.accuracy(output),
            "phone": sample_accuracy.accuracy(out / "out-pieces-phone", prefix="00_"),
            # finer grained (a photo is 0.1 point, not 1): all the bench's copies of the photos
            "imagenet_copies": sample_accuracy.accuracy(out / "out-pieces-imagenet"),
            "phone_copies": sample_accuracy.accuracy(out / "out-pieces-phone"),
            "source": str(bench.SHARED)}


def _one_image_dir(directory: Path, path: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / Path(path).name
    if not target.exists():
        shutil.copyfile(path, target)
    return directory


def _size_round(paths: list[str], directory: Path, output: Path, cfg, spec, predictor) -> dict:
    pre = spec.preprocess
    r: dict = {"cumulative_cpu_ms": {}}
    for key, make in _pipelines(paths, pre).items():
        r["cumulative_cpu_ms"][key] = _cpu_ms_per_image(make, len(paths))
    batches, r["reader_cpu_ms"] = _reader_batches(paths, pre)
    r["cumulative_cpu_ms"]["reader"] = r["reader_cpu_ms"]
    r["python_alone_cpu_ms"] = _python_pieces(paths, pre)
    r["libjpeg"] = _libjpeg_alone(paths, pre)
    r["model_handoff_cpu_ms"] = _model_handoff(predictor, batches)
    r["model_alone"] = _model_alone(predictor, batches)
    del batches
    r["cli"] = bench.time_cli(directory, output, cfg, [])
    return r


def _cpu_ms_per_image(make, n: int) -> float:
    dataset = make()
    for _ in dataset.take(1):  # warm-up: tracing, thread pools
        pass
    started = time.process_time()
    for _ in dataset:
        pass
    return 1000 * (time.process_time() - started) / n


def _pipelines(paths: list[str], pre) -> dict:
    """key -> a function making the cumulative pipeline that ends with that piece."""
    import tensorflow as tf

    from pipeline import devices
    from pipeline.reader import decode, geometry, graph, reading
    from pipeline.types import ReadLimits, S3Options

    limits, s3 = ReadLimits(), S3Options()
    window = geometry.center_window(pre.crop_fraction)
    target = geometry.scaled_target(pre, limits.scaled_decode)
    no_params = tf.zeros([0])

    def chunks():  # as ImageReader hands its refs to tf.data: a chunk of inputs at a time
        def generate():
            for start in range(0, len(paths), graph.CHUNK_INPUTS):
                part = paths[start:start + graph.CHUNK_INPUTS]
                yield (np.arange(start, start + len(part), dtype=np.int64),
                       np.array([os.fsencode(p) for p in part], object))
        spec = (tf.TensorSpec((None,), tf.int64), tf.TensorSpec((None,), tf.string))
        return tf.data.Dataset.from_generator(generate, output_signature=spec)

    def read_py(seqs, uris, with_sha):  # the reader's chunk read without the checks and plans
        data = [reading.read_capped(reading.as_bytes(u), limits.max_file_bytes, s3) for u in uris]
        sha = [reading.sha256_digest(d) if with_sha else np.zeros(32, np.uint8) for d in data]
        out = np.empty(len(data), object)
        out[:] = data
        return seqs, out, np.array(sha, np.uint8).reshape(-1, 32)

    def read(with_sha):
        def f(seqs, paths):
            return tf.numpy_function(lambda s, u: read_py(s, u, with_sha), [seqs, paths],
                                     [tf.int64, tf.string, tf.uint8], stateful=False)
        return f

    def planned(seqs, paths):
        return decode.chunk_bytes_and_plans(seqs, paths, pre, limits.max_pixels,
                                            limits.max_file_bytes, s3, limits.scaled_decode)

    def crop(data, plan):
        return decode.crop_of(data, decode.unpacked(plan), window, target, no_params,
                             limits.max_pixels)

    def stage(key):
        def f(seq, data, sha, plan, box):
            pixels, orientation = crop(data, plan)
            if key == "resize":
                pixels = geometry.resize(pixels, pre, decode.unpacked(plan).ratio_index > 0, box)
            elif key == "orient_normalize":
                pixels = decode.model_input(pixels, orientation, decode.unpacked(plan), box, pre,
                                            target)
            return tf.cast(pixels[0, 0, 0], tf.int32)
        return f

    def read_only(fn):  # the chunk reads alone, unbatched as the reader does
        fn = tf.autograph.experimental.do_not_convert(fn)
        return lambda: (chunks().map(fn, num_parallel_calls=graph.READ_CHUNKS).unbatch()
                        .batch(64).with_options(_options()))

    def decoded(fn):  # the chunk reads, then one map per image on every core
        fn = tf.autograph.experimental.do_not_convert(fn)
        return lambda: (chunks().map(planned, num_parallel_calls=graph.READ_CHUNKS).unbatch()
                        .map(fn, num_parallel_calls=devices.cpu_threads()).batch(64)
                        .with_options(_options()))

    return {
        "sequencing": lambda: chunks().unbatch().batch(64).with_options(_options()),
        "read": read_only(read(False)),
        "sha256": read_only(read(True)),
        "inspect_plan": read_only(planned),
        "decode_crop": decoded(stage("decode_crop")),
        "resize": decoded(stage("resize")),
        "orient_normalize": decoded(stage("orient_normalize")),
        "batches": lambda: graph.make_dataset(chunks(), pre, 64, limits.max_pixels),
    }


def _options():
    from pipeline.reader import graph

    return graph.dataset_options()


def _reader_batches(paths: list[str], pre) -> tuple[list[np.ndarray], float]:
    """The real ImageReader over the files: its batches (for the model) and CPU ms per image."""
    from pipeline.devices import CPU_BATCH_SIZE
    from pipeline.reader import ImageReader
    from pipeline.sources import local_ref

    def reader():
        return ImageReader([local_ref(p, Path(p)) for p in paths], pre, CPU_BATCH_SIZE)

    for _ in reader():  # warm-up
        break
    started = time.process_time()
    batches = [b.images for b in reader()]
    return batches, 1000 * (time.process_time() - started) / len(paths)


def _python_pieces(paths: list[str], pre) -> dict:
    """One thread, bytes in memory: imageinfo's inspect (+ prepare), the geometry plan."""
    from pipeline import imageinfo
    from pipeline.reader import checks, geometry
    from pipeline.types import ReadLimits

    limits = ReadLimits()
    window = geometry.center_window(pre.crop_fraction)
    target = geometry.scaled_target(pre, limits.scaled_decode)
    data = [Path(p).read_bytes() for p in paths]
    started = time.process_time()
    infos = [checks.checked(d, limits.max_pixels)[1] for d in data]
    inspected = time.process_time()
    for info in infos:
        geometry.plan(imageinfo.FORMAT_CODES[info.format], info.width, info.height,
                      info.orientation, info.check_last_block, window, target,
                      np.zeros(0, np.float32), info.format == "jpeg")
    planned = time.process_time()
    return {"inspect": 1000 * (inspected - started) / len(data),
            "plan": 1000 * (planned - inspected) / len(data)}


def _libjpeg_alone(paths: list[str], pre) -> dict:
    """(b0) libjpeg's decode + crop alone, at the place and DCT scale the reader's plan gives, on
    all cores, from bytes in memory: wall seconds and CPU ms per image."""
    seconds, cpu = bench.time_jpeg_decode_only(paths, pre, True)
    return {**bench.rate(len(paths), seconds), "cpu_ms_per_image": 1000 * cpu / len(paths)}


def _model_handoff(predictor, batches: list[np.ndarray]) -> float:
    """CPU ms per image of handing one image to the LiteRT interpreter and its scores back,
    without the invoke (the predictor's own interpreter and tensors)."""
    interpreter, index = predictor._interpreter, predictor._input["index"]
    predictor.predict(batches[0][:1])  # allocates for one image
    started = time.process_time()
    n = 0
    for batch in batches:
        for i in range(len(batch)):
            interpreter.set_tensor(index, np.ascontiguousarray(batch[i:i + 1], np.float32))
            interpreter.get_tensor(predictor._probabilities)
            n += 1
    return 1000 * (time.process_time() - started) / n


def _model_alone(predictor, batches: list[np.ndarray]) -> dict:
    started = time.process_time()
    seconds = bench.time_model(predictor, batches)
    n = sum(len(b) for b in batches)
    return {**bench.rate(n, seconds), "cpu_ms_per_image": 1000 * (time.process_time() - started) / n}


def _fastest(rounds: list[dict], size: str) -> dict:
    rs = [r[size] for r in rounds]
    cumulative = {k: min(r["cumulative_cpu_ms"][k] for r in rs) for k, _ in CUMULATIVE}
    pieces, previous = {}, 0.0
    for key, _ in CUMULATIVE:
        pieces[key] = cumulative[key] - previous
        previous = cumulative[key]
    return {
        "cumulative_cpu_ms": cumulative, "piece_cpu_ms": pieces,
        "python_alone_cpu_ms": {k: min(r["python_alone_cpu_ms"][k] for r in rs)
                                for k in rs[0]["python_alone_cpu_ms"]},
        "libjpeg": max((r["libjpeg"] for r in rs), key=lambda v: v["images_per_second"]),
        "libjpeg_cpu_ms": min(r["libjpeg"]["cpu_ms_per_image"] for r in rs),
        "model_handoff_cpu_ms": min(r["model_handoff_cpu_ms"] for r in rs),
        "model_alone": max((r["model_alone"] for r in rs), key=lambda v: v["images_per_second"]),
        "model_cpu_ms": min(r["model_alone"]["cpu_ms_per_image"] for r in rs),
        "cli": max((r["cli"] for r in rs), key=lambda v: v["images_per_second"]),
        "cli_cpu_ms": min(r["cli"]["cpu_ms_per_image"] for r in rs),
        "ceiling_rounds": [r["libjpeg"]["images"] / (r["model_alone"]["seconds"] + r["libjpeg"]["seconds"])
                           for r in rs],
        "cli_vs_ceiling_rounds": [
            r["cli"]["images_per_second"] * (r["model_alone"]["seconds"] + r["libjpeg"]["seconds"])
            / r["libjpeg"]["images"] for r in rs],
    }


def _targets(best: dict) -> dict:
    out = {}
    for size, goal in (("imagenet", 0.9), ("phone", 0.8)):
        b = best[size]
        ceiling = b["libjpeg"]["images"] / (b["model_alone"]["seconds"] + b["libjpeg"]["seconds"])
        ratio = b["cli"]["images_per_second"] / ceiling
        out[f"{size}_cli_vs_ceiling"] = {"ratio": ratio, "target": goal, "met": ratio >= goal,
                                         "ceiling_images_per_second": ceiling,
                                         "median_of_rounds": float(np.median(b["cli_vs_ceiling_rounds"]))}
        limit = b["model_cpu_ms"] + b["libjpeg_cpu_ms"] + 2.0
        out[f"{size}_cli_cpu_ms"] = {"value": b["cli_cpu_ms"], "limit": limit,
                                     "met": b["cli_cpu_ms"] <= limit,
                                     "beyond_startup": b["cli_cpu_ms_beyond_startup"]}
    return out


def print_pieces(r: dict) -> None:
    f = r["fastest"]
    im, ph = r["images"]["imagenet"], r["images"]["phone"]
    print(f"\nDecode stage piece by piece (issue 25): {im['n']} ImageNet-size JPEGs, {ph['n']} 12 MP "
          f"JPEGs (DCT-scaled decode); CPU ms per image (process CPU, all threads), minimum of "
          f"{len(r['rounds'])} interleaved rounds; load average per round "
          f"{', '.join(x['loadavg'] for x in r['rounds'])}")
    print(f"{'piece':56} {'ImageNet':>9} {'12 MP':>9}")

    def row(label, a, b, fmt="9.2f"):
        print(f"{label:56} {a:{fmt}} {b:{fmt}}")

    for key, label in CUMULATIVE:
        row(label, f["imagenet"]["piece_cpu_ms"][key], f["phone"]["piece_cpu_ms"][key])
    row("= decode stage (ImageReader, files -> batches)", f["imagenet"]["cumulative_cpu_ms"]["reader"],
        f["phone"]["cumulative_cpu_ms"]["reader"])
    row("  inspect alone (imageinfo, one thread)", f["imagenet"]["python_alone_cpu_ms"]["inspect"],
        f["phone"]["python_alone_cpu_ms"]["inspect"])
    row("  plan alone (geometry, one thread)", f["imagenet"]["python_alone_cpu_ms"]["plan"],
        f["phone"]["python_alone_cpu_ms"]["plan"])
    row("  libjpeg decode + crop alone (b0, from memory)", f["imagenet"]["libjpeg_cpu_ms"],
        f["phone"]["libjpeg_cpu_ms"])
    row("model hand-off (LiteRT input copy, scores back)", f["imagenet"]["model_handoff_cpu_ms"],
        f["phone"]["model_handoff_cpu_ms"])
    row("model alone (LiteRT invoke)", f["imagenet"]["model_cpu_ms"], f["phone"]["model_cpu_ms"])
    row("CLI end to end, whole process", f["imagenet"]["cli_cpu_ms"], f["phone"]["cli_cpu_ms"])
    row("CLI end to end, beyond its start-up", f["imagenet"]["cli_cpu_ms_beyond_startup"],
        f["phone"]["cli_cpu_ms_beyond_startup"])
    print(f"(CLI start-up, a 1-image run: {r['cli_startup_cpu_seconds']:.2f} CPU s)")
    print(f"{'images/s':56} {'ImageNet':>9} {'12 MP':>9}")
    for label, key in (("model alone", "model_alone"), ("(b0) libjpeg decode + crop alone", "libjpeg"),
                       ("CLI end to end", "cli")):
        row(label, f["imagenet"][key]["images_per_second"], f["phone"][key]["images_per_second"], "9.1f")
    t = r["targets"]
    row("ceiling 1/(T_model + T_libjpeg)", t["imagenet_cli_vs_ceiling"]["ceiling_images_per_second"],
        t["phone_cli_vs_ceiling"]["ceiling_images_per_second"], "9.1f")
    for size, label in (("imagenet", "ImageNet-size"), ("phone", "12 MP")):
        c, p = t[f"{size}_cli_vs_ceiling"], t[f"{size}_cli_cpu_ms"]
        rounds = ", ".join(f"{x:.2f}" for x in f[size]["cli_vs_ceiling_rounds"])
        print(f"  {label} CLI vs ceiling {c['ratio']:.2f} (target >= {c['target']}) "
              f"{'met' if c['met'] else 'NOT MET'}; rounds {rounds}")
        print(f"  {label} CLI CPU {p['value']:.1f} ms/image vs T_model + T_libjpeg + 2 = "
              f"{p['limit']:.1f} {'met' if p['met'] else 'NOT MET'} (beyond start-up "
              f"{p['beyond_startup']:.1f})")
    a = r.get("accuracy")
    if a:
        print(f"accuracy of the CLI's labels on the shared sample ({a['imagenet']['images']} photos; "
              f"12 MP: the same photos upscaled, {a['phone']['images']} rows):")
        print(f"{'':56} {'ImageNet':>9} {'12 MP':>9}")
        for k, label in (("top1", "top-1"), ("top5", "top-5")):
            row(label, a["imagenet"][k], a["phone"][k], "9.3f")
        n = f"{a['imagenet_copies']['images']} / {a['phone_copies']['images']}"
        for k, label in (("top1", "top-1"), ("top5", "top-5")):
            row(f"{label}, all the bench's copies of them ({n})", a["imagenet_copies"][k],
                a["phone_copies"][k], "9.3f")
