"""Ray Data engine: decode on CPU tasks, the model in an actor pool, results to the driver.

The driver keeps everything that makes a run safe (run.label: the lock, the done set, the
PartWriter on its background thread), exactly as with the local engine. Ray only computes: a
window of pending refs becomes a dataset of (seq, uri) rows; CPU tasks run the local engine's own
tf.data reader on them (identical preprocessing and per-image error accounting, the run's S3
options passed in); actors receive the pickled ModelSpec, hold the model and return top-k (never
the images). The images cross the object store as the run's feed makes them: uint8 pixels for
the Keras runtime (a quarter of float32's bytes; the actor normalizes), float32 for LiteRT.
Ray's write_parquet is not used: it writes straight into the destination and duplicates rows
when a run is repeated.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import signal
import threading
from typing import Generator, Iterable, Iterator

import numpy as np

from .. import interrupts
from ..exitcodes import ConfigError
from ..reader import ImageReader
from ..devices import Plan
from ..types import (NULL_INT, ErrorRecord, Feed, ImageRef, ModelSpec, Preprocess, ReadLimits,
                     S3Options)
from . import EngineJob, ResultBatch

WINDOW = 50_000  # refs listed per Ray dataset: bounds driver memory; each window restarts the actors
log = logging.getLogger(__name__)


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ConfigError("--engine ray needs Ray: pip install 'pipeline[ray]'") from e
    return ray


def results(pending: Iterable[ImageRef], job: EngineJob) -> Generator[ResultBatch, None, None]:
    """Label every pending ref on Ray; the cluster this run started is shut down however the
    run ends (also when the caller stops iterating)."""
    ray = import_ray()
    try:
        for window in windows(pending, WINDOW):
            if not ray.is_initialized():  # nothing new to label: no cluster is started
                connect(ray, job.cluster)
            for out in label_window(ray, window, job):
                yield result_batch(out, window)
    finally:
        ray.shutdown()


def connect(ray, address: str | None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS); without one, start a local cluster."""
    quiet = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    kwargs = dict(log_to_driver=False, runtime_env={"env_vars": quiet})
    if not (address or os.environ.get("RAY_ADDRESS")):
        # "local", not None: None joins whatever cluster $RAY_TMPDIR/ray/ray_current_cluster names
        # (left by `ray start` or another process's test cluster, possibly dead or dying).
        address = "local"
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


def label_window(ray, window: list[ImageRef], job: EngineJob) -> Iterator[dict]:
    """Batches of {seq, ok, width, height, top_idx, top_score, error_*} for one window."""
    resources = ray.cluster_resources()
    actors = actor_plan(resources)
    if resources.get("GPU") and job.plan.runtime == "litert":
        log.warning("the Ray cluster has GPUs, but this run uses LiteRT on the CPU (runtime "
                    "auto is decided on the driver host, which has none): pass --runtime keras")
    worker = job.plan.for_worker(actors["num_gpus"])
    batch_size = worker.batch_size
    items = [{"seq": i, "path": os.fsencode(ref.uri),
              "file_size": _none_as_null(ref.file_size), "entry_error": ref.entry_error or ""}
             for i, ref in enumerate(window)]
    blocks = max(1, -(-len(items) // batch_size))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(decode_batch, batch_size=batch_size, batch_format="numpy",
                        num_cpus=actors["decode_cpus"],
                        max_retries=-1,  # a lost worker's batch is decoded again (also keeps
                        # decoding in tasks: Ray would otherwise fuse it into the actors)
                        fn_kwargs={"pre": job.spec.preprocess, "batch_size": batch_size,
                                   "limits": job.limits, "s3": job.s3,
                                   "feed": worker.feed})
    ds = ds.map_batches(Labeler, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors["actors"]),
                        num_cpus=actors["num_cpus"], num_gpus=actors["num_gpus"],
                        fn_constructor_kwargs={"spec": job.spec, "plan": worker,
                                               "top_k": job.top_k, "threads": actors["threads"]})
    return ds.iter_batches(batch_size=None, batch_format="numpy")


def decode_batch(batch: dict, pre: Preprocess, batch_size: int, limits: ReadLimits,
                 s3: S3Options, feed: str = "float32") -> dict:
    """Ray task: the local engine's reader over (seq, path, file_size) rows; one row out per
    row in (paths travel as bytes: a file name need not be valid UTF-8). `feed`: the images'
    dtype, uint8 pixels or float32 model input (either is what the actors' predictors take)."""
    refs = [ImageRef(str(seq), os.fsdecode(bytes(path)), _null_as_none(size), None,
                     str(problem) or None)
            for seq, path, size, problem in zip(batch["seq"], batch["path"], batch["file_size"],
                                                batch["entry_error"])]
    parts = []
    for b in ImageReader(refs, pre, batch_size, limits, s3, Feed(feed)):
        parts.append(_decoded(b.refs, b.images, b.widths, b.heights, b.content_sha256))
        parts.append(_errored(b.errors, pre.size, feed))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _decoded(refs: list[ImageRef], images, widths, heights, hashes: list[str]) -> dict:
    n = len(refs)
    return {"seq": np.array([int(r.image_id) for r in refs], np.int64),
            "uri": np.array([r.uri for r in refs], object),  # as the reader prints it
            "sha256": np.array(hashes, object),
            "image": np.asarray(images),
            "width": np.asarray(widths, np.int64), "height": np.asarray(heights, np.int64),
            "error_kind": np.array([""] * n, object), "error_message": np.array([""] * n, object)}


def _errored(errors: list[ErrorRecord], size: int, feed: str) -> dict:
    n = len(errors)
    sizes = lambda v: np.array([_none_as_null(x) for x in v], np.int64)  # noqa: E731
    return {"seq": np.array([int(e.ref.image_id) for e in errors], np.int64),
            "uri": np.array([e.ref.uri for e in errors], object),
            "sha256": np.array([e.content_sha256 or "" for e in errors], object),
            "image": np.zeros((n, size, size, 3), feed),
            "width": sizes(e.width for e in errors), "height": sizes(e.height for e in errors),
            "error_kind": np.array([e.kind for e in errors], object),
            "error_message": np.array([e.message for e in errors], object)}


class Labeler:
    """Ray actor: builds the model of the ModelSpec it receives once, then turns decoded
    batches into top-k."""

    def __init__(self, spec: ModelSpec, plan: Plan, top_k: int, threads: int):
        import tensorflow as tf

        from .. import runtime

        # Ray starts workers with OMP_NUM_THREADS=1; TF must be told how many cores it owns
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, threads))
        for gpu in tf.config.list_physical_devices("GPU"):  # else TF takes all GPU memory
            tf.config.experimental.set_memory_growth(gpu, True)
        self._spec, self._top_k = spec, top_k
        self._predictor = runtime.load(spec, plan)

    def __call__(self, batch: dict) -> dict:
        """The batch without its images, plus top-k (and embeddings); error rows get zeros."""
        from ..runtime import score

        ok = batch["error_kind"] == ""
        scores = score(self._predictor, batch["image"][ok], self._spec, self._top_k)
        out = {key: value for key, value in batch.items() if key != "image"}
        out["top_idx"] = _scattered(scores.top_idx, ok)
        out["top_score"] = _scattered(scores.top_scores, ok)
        if scores.embeddings is not None:
            out["embedding"] = _scattered(scores.embeddings, ok)
        return out


def _scattered(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`values` placed at the True positions of `rows`; zeros elsewhere."""
    out = np.zeros((len(rows), *values.shape[1:]), values.dtype)
    out[rows] = values
    return out


def result_batch(out: dict, window: list[ImageRef]) -> ResultBatch:
    """Driver side: one batch of actor output as a ResultBatch of the window's refs."""
    ok = out["error_kind"] == ""
    refs = [_as_read(window[s], uri) for s, uri in zip(out["seq"][ok], out["uri"][ok])]
    errors = [ErrorRecord(_as_read(window[s], uri), str(kind), str(msg), _null_as_none(w),
                          _null_as_none(h), str(sha) or None)
              for s, uri, kind, msg, w, h, sha in zip(
                  out["seq"][~ok], out["uri"][~ok], out["error_kind"][~ok],
                  out["error_message"][~ok], out["width"][~ok], out["height"][~ok],
                  out["sha256"][~ok])]
    embeddings = out["embedding"][ok] if "embedding" in out else None
    return ResultBatch(refs, out["width"][ok], out["height"][ok], out["top_idx"][ok],
                       out["top_score"][ok], errors, [str(h) for h in out["sha256"][ok]],
                       embeddings)


def _as_read(ref: ImageRef, uri: str) -> ImageRef:
    """The driver's ref with the uri the reader wrote (made printable, as the local engine)."""
    return ref if ref.uri == uri else dataclasses.replace(ref, uri=str(uri))


def _null_as_none(value) -> int | None:
    """A size that crossed Ray as an int64 array element, with NULL_INT back to None."""
    return None if value == NULL_INT else int(value)


def _none_as_null(value: int | None) -> int:
    """A size that may be None, as an int64 Ray can put in an array (None -> NULL_INT)."""
    return NULL_INT if value is None else value
