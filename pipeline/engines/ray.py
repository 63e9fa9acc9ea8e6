"""Ray Data engine: decode on CPU tasks, the model in an actor pool, commit on the driver.

The driver keeps everything that makes a run safe: the lock, the done set, and the PartWriter
(the same atomic parts the local engine writes). Ray only computes: a window of pending refs
becomes a dataset of (seq, uri) rows; CPU tasks run the local engine's own tf.data reader on
them (identical preprocessing and per-image error accounting); actors hold the model and return
top-k (never the images) to the driver. Ray's write_parquet is not used: it writes straight into
the destination and duplicates rows when a run is repeated.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import threading
from typing import Iterable, Iterator

import numpy as np

from .. import devices, interrupts
from ..config import ConfigError, RunConfig
from ..progress import Progress
from ..reader import ImageReader
from ..types import ErrorRecord, ImageRef, ModelSpec, Preprocess, ReadLimits
from ..writer import PartWriter, RunStamp, error_table, prediction_table

WINDOW = 50_000  # refs listed per Ray dataset: bounds driver memory; each window restarts the actors
NO_SIZE = -1  # a size (width, height, file size) that is unknown


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ConfigError("--engine ray needs Ray: pip install 'pipeline[ray]'") from e
    return ray


def run(pending: Iterable[ImageRef], spec: ModelSpec, writer: PartWriter, stamp: RunStamp,
        cfg: RunConfig, progress: Progress, result) -> None:
    """Label every pending ref on Ray into committed parts, counting into `result` (an
    EngineResult). Rows finished before an exception are committed; the cluster this run
    started is shut down however the run ends."""
    ray = import_ray()
    try:
        for window in windows(pending, WINDOW):
            if not ray.is_initialized():  # nothing new to label: no cluster is started
                connect(ray, cfg.ray_address)
            for out in label_window(ray, window, spec.preprocess, cfg):
                commit_rows(out, window, writer, stamp, progress, result)
    finally:
        try:
            writer.commit()
        finally:
            ray.shutdown()


def connect(ray, address: str | None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS); without one, start a local cluster."""
    quiet = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    kwargs = dict(log_to_driver=False, runtime_env={"env_vars": quiet})
    if not (address or os.environ.get("RAY_ADDRESS")):
        kwargs["include_dashboard"] = False
    handlers = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {e}") from e
    finally:  # ray.init replaces SIGTERM with sys.exit: keep the run's Interrupted (exit 130)
        if threading.current_thread() is threading.main_thread():
            for s, handler in handlers.items():
                signal.signal(s, handler)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the run has its own progress line
    ctx.execution_options.preserve_order = False


def windows(refs: Iterable[ImageRef], size: int) -> Iterator[list[ImageRef]]:
    it = iter(refs)
    while window := list(itertools.islice(it, size)):
        yield window


def actor_plan(resources: dict) -> dict:
    """Model actors and what each holds: one per GPU; on CPUs, half the cores go to actors and
    the rest stays free for decode tasks, so actors can never starve the reading (ray#44687)."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        return {"actors": gpus, "num_gpus": 1, "num_cpus": 1, "threads": 1, "decode_cpus": 1}
    if cpus < 2:
        return {"actors": 1, "num_gpus": 0, "num_cpus": 0.5, "threads": 1, "decode_cpus": 0.5}
    actors = max(1, cpus // 4)
    threads = max(1, (cpus // 2) // actors)
    return {"actors": actors, "num_gpus": 0, "num_cpus": threads, "threads": threads,
            "decode_cpus": 1}


def label_window(ray, window: list[ImageRef], pre: Preprocess, cfg: RunConfig) -> Iterator[dict]:
    """Batches of {seq, ok, width, height, top_idx, top_score, error_*} for one window."""
    resources = ray.cluster_resources()
    plan = actor_plan(resources)
    batch_size = cfg.batch_size or (
        devices.GPU_BATCH_SIZE_PER_DEVICE if resources.get("GPU") else devices.CPU_BATCH_SIZE)
    items = [{"seq": i, "path": os.fsencode(ref.uri), "file_size": _or_none(ref.file_size),
              "entry_error": ref.entry_error or ""} for i, ref in enumerate(window)]
    blocks = max(1, -(-len(items) // batch_size))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(decode_batch, batch_size=batch_size, batch_format="numpy",
                        num_cpus=plan["decode_cpus"],
                        max_retries=-1,  # a lost worker's batch is decoded again (also keeps
                        # decoding in tasks: Ray would otherwise fuse it into the actors)
                        fn_kwargs={"pre": pre, "batch_size": batch_size,
                                   "limits": cfg.read_limits()})
    ds = ds.map_batches(Labeler, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan["actors"]),
                        num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"],
                        fn_constructor_kwargs={"cfg": cfg, "threads": plan["threads"]})
    return ds.iter_batches(batch_size=None, batch_format="numpy")


def decode_batch(batch: dict, pre: Preprocess, batch_size: int, limits: ReadLimits) -> dict:
    """Ray task: the local engine's reader over (seq, path, file_size) rows; one row out per
    row in (paths travel as bytes: a file name need not be valid UTF-8)."""
    refs = [ImageRef(str(seq), os.fsdecode(bytes(path)), _size(size), None, str(problem) or None)
            for seq, path, size, problem in zip(batch["seq"], batch["path"], batch["file_size"],
                                                batch["entry_error"])]
    parts = []
    for b in ImageReader(refs, pre, batch_size, limits):
        parts.append(_decoded(b.refs, b.images, b.widths, b.heights, ok=True))
        parts.append(_errored(b.errors, pre.size))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _decoded(refs: list[ImageRef], images, widths, heights, ok: bool) -> dict:
    n = len(refs)
    return {"seq": np.array([int(r.image_id) for r in refs], np.int64),
            "uri": np.array([r.uri for r in refs], object),  # as the reader prints it
            "image": images.astype(np.float32),
            "width": np.asarray(widths, np.int64), "height": np.asarray(heights, np.int64),
            "error_kind": np.array([""] * n, object), "error_message": np.array([""] * n, object)}


def _errored(errors: list[ErrorRecord], size: int) -> dict:
    n = len(errors)
    sizes = lambda v: np.array([_or_none(x) for x in v], np.int64)  # noqa: E731
    return {"seq": np.array([int(e.ref.image_id) for e in errors], np.int64),
            "uri": np.array([e.ref.uri for e in errors], object),
            "image": np.zeros((n, size, size, 3), np.float32),
            "width": sizes(e.width for e in errors), "height": sizes(e.height for e in errors),
            "error_kind": np.array([e.kind for e in errors], object),
            "error_message": np.array([e.message for e in errors], object)}


class Labeler:
    """Ray actor: loads the model once, then turns decoded batches into top-k."""

    def __init__(self, cfg: RunConfig, threads: int):
        import tensorflow as tf

        from .. import models, runtime

        # Ray starts workers with OMP_NUM_THREADS=1; TF must be told how many cores it owns
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, threads))
        for gpu in tf.config.list_physical_devices("GPU"):  # else TF takes all GPU memory
            tf.config.experimental.set_memory_growth(gpu, True)
        self._top_k = cfg.top_k
        self._predictor = runtime.load(models.get(cfg.model_request()), cfg.device_request())

    def __call__(self, batch: dict) -> dict:
        from ..runtime import top_k

        ok = batch["error_kind"] == ""
        n = len(ok)
        idx, scores = top_k(self._predictor.predict(batch["image"][ok]), self._top_k)
        k = idx.shape[1]
        top_idx = np.zeros((n, k), np.int64)
        top_score = np.zeros((n, k), np.float32)
        top_idx[ok], top_score[ok] = idx, scores
        out = {key: value for key, value in batch.items() if key != "image"}
        out.update(top_idx=top_idx, top_score=top_score)
        return out


def commit_rows(out: dict, window: list[ImageRef], writer: PartWriter, stamp: RunStamp,
                progress: Progress, result) -> None:
    """Driver side: rows of one result batch -> the PartWriter, counted into `result`."""
    ok = out["error_kind"] == ""
    refs = [_as_read(window[s], uri) for s, uri in zip(out["seq"][ok], out["uri"][ok])]
    if refs:
        writer.add(prediction_table(refs, out["width"][ok], out["height"][ok],
                                    out["top_idx"][ok], out["top_score"][ok], stamp))
    errors = [ErrorRecord(_as_read(window[s], uri), str(kind), str(msg), _size(w), _size(h))
              for s, uri, kind, msg, w, h in zip(out["seq"][~ok], out["uri"][~ok],
                                                 out["error_kind"][~ok], out["error_message"][~ok],
                                                 out["width"][~ok], out["height"][~ok])]
    progress.update(len(refs), len(errors))
    errors = result.new_errors(errors)
    if errors:
        writer.add(error_table(errors, stamp))
    result.labeled += len(refs)


def _as_read(ref: ImageRef, uri: str) -> ImageRef:
    """The driver's ref with the uri the reader wrote (made printable, as the local engine)."""
    return ref if ref.uri == uri else dataclasses.replace(ref, uri=str(uri))


def _size(value) -> int | None:
    return None if value == NO_SIZE else int(value)


def _or_none(value: int | None) -> int:
    return NO_SIZE if value is None else value
