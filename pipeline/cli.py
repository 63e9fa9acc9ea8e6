"""Command line: parse flags, load configs/*.toml, build one RunConfig, call run.label."""
from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand

from . import exitcodes, logs
from .config import build_config, read_toml

log = logging.getLogger(__name__)

EXIT_CODES_HELP = exitcodes.HELP
INTERRUPTED_MESSAGE = "interrupted, run the same command again to resume"


class _Command(TyperCommand):
    """Usage reads `label [OPTIONS] INPUT OUTPUT` (typer would write `{input} {output}`)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [p.name.upper() for p in self.get_params(ctx)
                         if p.param_type_name == "argument"]


# rich_markup_mode=None: plain help, so "[auto: 64 on CPU, ...]" defaults are shown, not eaten
# as Rich markup, and cron/CI logs get no box drawing.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Label images with an ImageNet network into a Parquet dataset, offline and resumable.",
    epilog=EXIT_CODES_HELP,
)


def _quiet_tensorflow() -> None:
    from .tfimport import import_tensorflow_quietly

    import_tensorflow_quietly()


@app.command(cls=_Command, epilog=EXIT_CODES_HELP)
def label(
    input: str = typer.Argument(..., metavar="INPUT",
                                help="Folder or s3://bucket/prefix/ of images (recursive), a single image, a "
                                     "manifest: .txt (a path per line), .csv/.parquet (column 'path', optional 'id'), "
                                     "or an S3 Inventory's manifest.json (local or s3://): its rows are the listing."),
    output: str = typer.Argument(..., metavar="OUTPUT", help="Parquet dataset directory (created if missing) or s3://bucket/prefix/."),
    model: Optional[str] = typer.Option(None, help="Registry name (see `pipeline models`), or a custom "
                                        "model: a .keras file or SavedModel directory. "
                                        "Default: efficientnet_lite0, embedded, works offline."),
    weights: Optional[str] = typer.Option(None, help="Weights file for a registry MODEL (air-gapped "
                                          "hosts): the .h5 Keras downloads, or a Lite .pth."),
    labels: Optional[str] = typer.Option(None, help="Custom model: class names, .txt (one per line) or "
                                         ".json (list, {index: name} or {index: [id, name]})."),
    input_size: Optional[int] = typer.Option(None, help="Custom model: input side in pixels, if the "
                                             "model does not fix it."),
    preprocess: Optional[str] = typer.Option(None, help="Custom model: tf | torch | caffe | lite | raw "
                                             "(its keras preprocess_input mode; raw = 0..255)."),
    batch_size: Optional[int] = typer.Option(
        None, help="Images per inference batch [auto: 64 on CPU, 256 per GPU]."),
    top_k: Optional[int] = typer.Option(None, help="Labels kept per image [5]."),
    part_size: Optional[int] = typer.Option(None, help="Rows per committed Parquet part [4096]."),
    overwrite: Optional[bool] = typer.Option(
        None, "--overwrite", help="Relabel every input with MODEL; the earlier rows of MODEL stay "
        "readable until this run completes, then are removed (a killed run is continued by the "
        "next run of MODEL)."),
    max_error_rate: Optional[float] = typer.Option(
        None, help="Fraction of new inputs allowed to fail before exit code 1 (a failure "
        "unchanged since the last run does not count) [0.05]."),
    allow_empty: Optional[bool] = typer.Option(
        None, "--allow-empty", help="An INPUT with no images exits 0 (else exit 2: an empty or "
        "unmounted folder, an empty manifest)."),
    embeddings: Optional[bool] = typer.Option(
        None, "--embeddings", help="Add an `embedding` column: the network's pooled features "
        "(EfficientNet-Lite0: 1280 float16 values, L2-normalized) from the same forward pass. "
        "Rows labeled without one are labeled again."),
    max_pixels: Optional[int] = typer.Option(
        None, help="Refuse images above this many pixels, read from the header [90000000]."),
    max_file_bytes: Optional[int] = typer.Option(
        None, help="Refuse files above this many bytes without reading them [536870912]."),
    scaled_decode: Optional[bool] = typer.Option(
        None, "--scaled-decode/--no-scaled-decode", show_default=False,
        help="A JPEG whose crop is at least 3x the model input (a phone photo) decodes at 1/2, "
        "1/4 or 1/8 scale, the smallest that keeps 1.5x the input size [on]. Off: full-scale "
        "decode (scores differ slightly, so switching relabels: see README)."),
    runtime: Optional[str] = typer.Option(
        None, help="auto | keras | litert [auto: litert (XNNPACK) on CPU hosts, keras on GPU hosts]."),
    precision: Optional[str] = typer.Option(
        None, help="auto | float32 | float16 | bfloat16 | int8 [auto: mixed float16 on GPUs with "
                   "compute capability >= 7.0, float32 otherwise]. float16/bfloat16 need the keras "
                   "runtime; int8 (full-integer, calibrated on shipped photos) the litert runtime."),
    feed: Optional[str] = typer.Option(
        None, help="auto | uint8 | float32: what the reader hands the model [auto: uint8 pixels to "
                   "keras, normalized on its device; float32 input to litert]."),
    engine: Optional[str] = typer.Option(
        None, help="local (this process) | ray (Ray Data, needs pipeline[ray]) [local]."),
    ray_address: Optional[str] = typer.Option(
        None, help="--engine ray: the cluster to join, e.g. ray://head:10001 or auto "
        "[$RAY_ADDRESS, else a local cluster on this machine]."),
    cache_dir: Optional[str] = typer.Option(None, help="Converted weights cache [~/.cache/pipeline]."),
    progress: Optional[str] = typer.Option(
        None, help="auto (bar on a terminal, log line every 30 s otherwise) | bar | log | none."),
    json_summary: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    s3_endpoint: Optional[str] = typer.Option(
        None, help="S3-compatible endpoint URL, e.g. http://minio:9000 [$AWS_ENDPOINT_URL, else AWS]."),
    s3_region: Optional[str] = typer.Option(None, help="S3 region [$AWS_REGION, else us-east-1]."),
    s3_max_attempts: Optional[int] = typer.Option(
        None, help="Attempts per S3 request, with backoff (timeouts, 5xx, throttling) [5]."),
    s3_connect_timeout: Optional[float] = typer.Option(None, help="S3 connect timeout, seconds [5]."),
    s3_request_timeout: Optional[float] = typer.Option(None, help="S3 request timeout, seconds [30]."),
    s3_lock_lease: Optional[float] = typer.Option(
        None, help="An S3 lock not refreshed for this many seconds is stale [600]."),
    inventory_prefix: Optional[str] = typer.Option(
        None, help="S3 Inventory INPUT: only keys under this prefix, image ids relative to it (the "
        "ids labeling s3://BUCKET/PREFIX gives) [whole bucket, ids = keys]."),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="TOML file (e.g. configs/nightly.toml); flags override it."),
    debug: bool = typer.Option(False, "--debug", help="On an unexpected error, print the "
                               "traceback here too (it is always in OUTPUT/_runs/<run_id>.log)."),
) -> None:
    """Label every image under INPUT into OUTPUT (one Parquet row per image).

    Re-running the same command resumes: images already in OUTPUT (same id, size and mtime)
    are skipped, so a nightly job labels only what is new. A changed file is labeled again.
    """
    flags = dict(input=input, output=output, model=model, weights=weights, labels=labels,
                 input_size=input_size, preprocess=preprocess, batch_size=batch_size,
                 top_k=top_k, part_size=part_size, max_error_rate=max_error_rate,
                 max_pixels=max_pixels, max_file_bytes=max_file_bytes,
                 scaled_decode=scaled_decode, overwrite=overwrite,
                 allow_empty=allow_empty, embeddings=embeddings,
                 runtime=runtime, precision=precision, feed=feed, engine=engine, ray_address=ray_address,
                 cache_dir=cache_dir, progress=progress, json=json_summary or None,
                 s3_endpoint=s3_endpoint, s3_region=s3_region,
                 s3_max_attempts=s3_max_attempts, s3_connect_timeout=s3_connect_timeout,
                 s3_request_timeout=s3_request_timeout, s3_lock_lease=s3_lock_lease,
                 inventory_prefix=inventory_prefix)

    def start():
        cfg = build_config(read_toml(config) if config else {}, flags, source=str(config))
        _quiet_tensorflow()
        from . import run as run_mod

        return cfg, run_mod.label(cfg)

    cfg, summary = _run_command(start, debug=debug)
    _print_summary(summary, cfg.json)
    raise typer.Exit(summary.exit_code)


def _run_command(start, interrupted_message: str = INTERRUPTED_MESSAGE, debug: bool = False):
    """Call start() with signals turned into Interrupted; any failure becomes one `error:` line
    and its exit code (exitcodes.outcome: the one mapping for every command)."""
    from . import interrupts

    logs.setup()
    try:
        with interrupts.raised_on_signals(), interrupts.exit_when_stuck(
                exitcodes.INTERRUPTED, f"error: {interrupted_message}"):
            return start()
    except (Exception, KeyboardInterrupt) as e:  # SystemExit / typer.Exit pass through
        if isinstance(e, typer.Exit):
            raise
        raise _fail(e, interrupted_message, debug) from None


def _fail(exc: BaseException, interrupted_message: str, debug: bool) -> "typer.Exit":
    outcome = exitcodes.outcome(exc, interrupted_message)
    message = outcome.message
    if outcome.unexpected:
        saved = getattr(exc, "traceback_log", None)
        if debug:
            sys.stderr.write(logs.format_traceback(exc))
        elif saved:
            message += f" (traceback in {saved})"
        else:
            message += " (run with --debug for the traceback)"
    log.error(message)
    return typer.Exit(outcome.code)


@app.command(cls=_Command, epilog=EXIT_CODES_HELP)
def compact(
    output: str = typer.Argument(..., metavar="OUTPUT",
                                 help="Parquet dataset directory or s3:// prefix written by `pipeline label`."),
    part_size: Optional[int] = typer.Option(
        None, help="Most rows per compacted file [about 128 MB of Parquet each]."),
    full: bool = typer.Option(False, "--full", help="Rewrite every file, not only the new parts "
                              "and the files they supersede rows of."),
    s3_endpoint: Optional[str] = typer.Option(
        None, help="S3-compatible endpoint URL [$AWS_ENDPOINT_URL, else AWS]."),
    s3_region: Optional[str] = typer.Option(None, help="S3 region [$AWS_REGION, else us-east-1]."),
) -> None:
    """Keep only the latest row per (image_id, model), in large files sorted by image_id.

    Incremental: rewrites the parts written since the last compaction and the compacted files
    holding rows they supersede. Takes the lock like `label`; a killed compaction is undone or
    finished at the next start, locally and on S3.
    """
    from .compact import compact as compact_output
    from .types import S3Options

    summary = _run_command(lambda: compact_output(output, part_size, full,
                                                  S3Options(s3_endpoint, s3_region)))
    typer.echo(summary.message or summary.line(), err=True)


REPORT_EXIT_CODES_HELP = (
    "Exit codes: 0 report written; 2 usage error (OUTPUT not found, a bad option); 4 any other "
    "failure (a corrupt part in OUTPUT, S3 unreachable, the page cannot be written)."
)


@app.command(cls=_Command, epilog=REPORT_EXIT_CODES_HELP)
def report(
    output: str = typer.Argument(..., metavar="OUTPUT",
                                 help="Parquet dataset directory or s3:// prefix written by `pipeline label`."),
    html: str = typer.Option("report.html", "-o", "--out", help="The HTML file to write."),
    thumbnails: str = typer.Option("embed", help="embed (data: URIs, one file) | dir (JPEGs in "
                                   "<name>_thumbnails/ beside the page)."),
    max_thumbnails: int = typer.Option(400, help="Most images with a thumbnail; the rest get a placeholder."),
    thumbnail_size: int = typer.Option(160, help="Longest side of a thumbnail, pixels."),
    top_labels: int = typer.Option(15, help="Labels in each model's bar chart."),
    sheet_labels: int = typer.Option(8, help="Top labels with a contact sheet."),
    per_label: int = typer.Option(6, help="Thumbnails per contact sheet (a fixed sample)."),
    review: int = typer.Option(24, help="Images in the low-confidence review queue."),
    error_examples: int = typer.Option(5, help="Examples per error kind."),
    duplicate_groups: int = typer.Option(20, help="Groups shown per kind of duplicate."),
    near_threshold: float = typer.Option(0.7, help="Near duplicates: embedding cosine similarity at least this."),
    near_sample: int = typer.Option(5000, help="Near duplicates: most images compared (their "
                                    "embeddings are read; whole row groups are sampled)."),
    max_pixels: Optional[int] = typer.Option(
        None, help="Source images above this many pixels (by their header) get a placeholder [90000000]."),
    max_file_bytes: Optional[int] = typer.Option(
        None, help="Source files above this many bytes are not read [536870912]."),
    s3_endpoint: Optional[str] = typer.Option(
        None, help="S3-compatible endpoint URL [$AWS_ENDPOINT_URL, else AWS]."),
    s3_region: Optional[str] = typer.Option(None, help="S3 region [$AWS_REGION, else us-east-1]."),
    debug: bool = typer.Option(False, "--debug", help="On an unexpected error, print the traceback."),
) -> None:
    """Write one self-contained HTML page (works offline) showing what OUTPUT holds.

    Totals per model and runs, top labels, score distribution, contact sheets, the
    low-confidence review queue, errors by kind, exact and near duplicates. Reads only the
    current row of each image and model; every list is capped.
    """
    def start():
        from .report import ReportOptions, write_report
        from .types import ReadLimits, S3Options

        options = ReportOptions(
            thumbnails=thumbnails, max_thumbnails=max_thumbnails, thumbnail_size=thumbnail_size,
            top_labels=top_labels, sheet_labels=sheet_labels, per_label=per_label, review=review,
            error_examples=error_examples, duplicate_groups=duplicate_groups,
            near_threshold=near_threshold, near_sample=near_sample)
        limits = ReadLimits(**{k: v for k, v in (("max_pixels", max_pixels),
                                                  ("max_file_bytes", max_file_bytes)) if v})
        return write_report(output, html, options, limits, S3Options(s3_endpoint, s3_region))

    summary = _run_command(start, "interrupted, the report was not written", debug=debug)
    typer.echo(summary.line(), err=True)


def _print_summary(summary, as_json: bool) -> None:
    import dataclasses

    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(summary)))
        return
    typer.echo(summary.line(), err=True)
    if summary.errors_by_kind:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(summary.errors_by_kind.items()))
        typer.echo(f"errors by kind: {kinds}", err=True)
    if summary.message:
        typer.echo(summary.message, err=True)


@app.command(cls=_Command)
def models(
    cache_dir: Optional[str] = typer.Option(None, help="Converted weights cache [~/.cache/pipeline]."),
) -> None:
    """List the models: name, input size, parameters, published ImageNet top-1, where the weights
    come from and whether they are on this machine (embedded / cached / needs download)."""
    def table():
        from .models import ModelRequest, list_entries

        request = ModelRequest(**({"cache_dir": cache_dir} if cache_dir else {}))
        return [(e.name, f"{e.input_size}", f"{e.params_millions or '?'}M",
                 f"{e.imagenet_top1 or '?'}%", e.weights_source, e.offline(request))
                for e in list_entries()]

    rows = [("name", "input", "params", "top-1", "weights", "offline here"), *_run_command(table)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


FINETUNE_EXIT_CODES_HELP = (
    "Exit codes: 0 success; 2 usage error or unusable training data; 3 BUNDLE is locked by "
    "another run; 4 fatal runtime error; 130 interrupted (add --resume to continue from the "
    "last completed epoch)."
)


@app.command(cls=_Command, epilog=FINETUNE_EXIT_CODES_HELP)
def finetune(
    data: str = typer.Argument(..., metavar="DATA", help="Training images: a folder with one subfolder per class, "
                               "or a .csv/.parquet manifest with 'path' and 'label' columns "
                               "(relative paths resolve against the manifest's folder; "
                               "s3:// paths are read from S3; an optional 'id' column names "
                               "the image)."),
    bundle: str = typer.Argument(..., metavar="BUNDLE", help="Bundle directory to write (model.keras, labels.json, "
                                 "preprocess.json, metrics.json, bundle.json)."),
    base: Optional[str] = typer.Option(None, help="Pretrained base network, a name from "
                                       "`pipeline models`; default efficientnet_lite0."),
    epochs: Optional[int] = typer.Option(None, help="Most epochs per phase (head, then fine-tune) [30]."),
    val_split: Optional[float] = typer.Option(
        None, help="Share of each class held out for validation and early stopping [0.2]."),
    unfreeze_top: Optional[int] = typer.Option(
        None, help="After the head, also train the base's top K layer groups at "
        "learning-rate / 10; BatchNorm stays frozen [0]."),
    batch_size: Optional[int] = typer.Option(None, help="Images per training batch [32]."),
    learning_rate: Optional[float] = typer.Option(None, help="Adam learning rate of the head [0.001]."),
    seed: Optional[int] = typer.Option(None, help="Split, augmentation and init seed; "
                                       "the same seed gives the same model [0]."),
    patience: Optional[int] = typer.Option(
        None, help="Stop a phase after this many epochs without a better validation loss [5]."),
    augment_copies: Optional[int] = typer.Option(
        None, help="Fixed augmented views (flip, small crop) per training image [3]."),
    cache_dir: Optional[str] = typer.Option(None, help="Converted weights cache [~/.cache/pipeline]."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run after its "
                                "last completed epoch (same DATA and options)."),
    json_summary: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    debug: bool = typer.Option(False, "--debug", help="On an unexpected error, print the traceback."),
) -> None:
    """Fine-tune a pretrained network on the classes in DATA into BUNDLE.

    Then label with it: `pipeline label INPUT OUTPUT --model BUNDLE`.
    """
    import dataclasses

    options = dict(base=base, epochs=epochs, val_split=val_split, unfreeze_top=unfreeze_top,
                   batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                   patience=patience, augment_copies=augment_copies, cache_dir=cache_dir)

    def start():
        from .finetune import FinetuneConfig
        from .finetune import finetune as train

        cfg = FinetuneConfig(data=data, bundle=bundle, resume=resume,
                             **{k: v for k, v in options.items() if v is not None})
        _quiet_tensorflow()
        return train(cfg)

    summary = _run_command(start, "interrupted; run the same command with --resume to continue "
                           "after the last completed epoch", debug=debug)
    if json_summary:
        typer.echo(json.dumps(dataclasses.asdict(summary)))
    else:
        typer.echo(summary.line(), err=True)


def main() -> None:
    """Run the CLI, then leave with os._exit once Python's own exit handlers have run: native
    threads of TensorFlow or Arrow still alive in C++ static destructors can abort the process
    ("terminate called without an active exception"), turning a clean exit code into -6."""
    code = _exit_code(_run_app)
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_app() -> None:
    try:
        app()
    except exitcodes.UsageError as e:  # raised before a command's own handling (e.g. a callback)
        logs.setup()
        log.error(str(e))
        sys.exit(exitcodes.USAGE)


def _exit_code(run) -> int:
    try:
        run()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    main()
