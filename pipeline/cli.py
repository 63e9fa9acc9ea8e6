"""Command line: parse flags, load configs/*.toml, build one RunConfig, call run.label."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .config import ConfigError, build_config, read_toml

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 per-image errors above --max-error-rate; 2 usage or config error; "
    "3 OUTPUT is locked by another run; 4 fatal runtime error (e.g. OUTPUT unwritable); "
    "130 interrupted (finished work is kept: run the same command again to resume)."
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Label images with an ImageNet network into a Parquet dataset, offline and resumable.",
    epilog=EXIT_CODES_HELP,
)


def _quiet_tensorflow() -> None:
    from .tfimport import import_tensorflow_quietly

    import_tensorflow_quietly()


def _fail(message: str, code: int) -> "typer.Exit":
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command(epilog=EXIT_CODES_HELP)
def label(
    input: str = typer.Argument(..., help="Folder or s3://bucket/prefix/ of images (recursive), a single image, or a "
                                "manifest: .txt (a path per line), .csv/.parquet (column 'path', optional 'id')."),
    output: str = typer.Argument(..., help="Parquet dataset directory (created if missing) or s3://bucket/prefix/."),
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
        None, help="Fraction of inputs allowed to fail before exit code 1 [0.05]."),
    max_pixels: Optional[int] = typer.Option(
        None, help="Refuse images above this many pixels, read from the header [90000000]."),
    max_file_bytes: Optional[int] = typer.Option(
        None, help="Refuse files above this many bytes without reading them [536870912]."),
    runtime: Optional[str] = typer.Option(
        None, help="auto | keras | litert [auto: litert (XNNPACK) on CPU hosts, keras on GPU hosts]."),
    precision: Optional[str] = typer.Option(
        None, help="auto | float32 | float16 | bfloat16 [auto: mixed float16 on GPUs with compute "
                   "capability >= 7.0, float32 otherwise]. float16/bfloat16 need the keras runtime."),
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
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="TOML file (e.g. configs/nightly.toml); flags override it."),
) -> None:
    """Label every image under INPUT into OUTPUT (one Parquet row per image).

    Re-running the same command resumes: images already in OUTPUT (same id, size and mtime)
    are skipped, so a nightly job labels only what is new. A changed file is labeled again.
    """
    flags = dict(input=input, output=output, model=model, weights=weights, labels=labels,
                 input_size=input_size, preprocess=preprocess, batch_size=batch_size,
                 top_k=top_k, part_size=part_size, max_error_rate=max_error_rate,
                 max_pixels=max_pixels, max_file_bytes=max_file_bytes, overwrite=overwrite,
                 runtime=runtime, precision=precision, engine=engine, ray_address=ray_address,
                 cache_dir=cache_dir, progress=progress, json=json_summary or None,
                 s3_endpoint=s3_endpoint, s3_region=s3_region,
                 s3_max_attempts=s3_max_attempts, s3_connect_timeout=s3_connect_timeout,
                 s3_request_timeout=s3_request_timeout, s3_lock_lease=s3_lock_lease)

    def start():
        cfg = build_config(read_toml(config) if config else {}, flags, source=str(config))
        _quiet_tensorflow()
        from . import run as run_mod

        return cfg, run_mod.label(cfg)

    cfg, summary = _run_command(start)
    _print_summary(summary, cfg.json)
    raise typer.Exit(summary.exit_code)


def _run_command(start):
    """Call start() with signals turned into Interrupted; map failures to exit codes."""
    from . import interrupts, run as run_mod
    from .checkpoint import CorruptPart, OutputLocked
    from .storage import S3Unavailable
    from .writer import OutputError

    try:
        with interrupts.raised_on_signals():
            return start()
    except ConfigError as e:
        raise _fail(str(e), run_mod.EXIT_USAGE)
    except OutputLocked as e:
        raise _fail(str(e), run_mod.EXIT_LOCKED)
    except (interrupts.Interrupted, KeyboardInterrupt):  # before or after the labeling itself
        raise _fail(run_mod.INTERRUPTED_MESSAGE, run_mod.EXIT_INTERRUPTED)
    except CorruptPart as e:
        raise _fail(str(e), run_mod.EXIT_FATAL)
    except OutputError as e:
        raise _fail(f"{e}; committed parts are kept, fix it and run the same command again",
                    run_mod.EXIT_FATAL)
    except S3Unavailable as e:
        raise _fail(f"{e}; committed parts are kept, run the same command again to resume",
                    run_mod.EXIT_FATAL)
    except OSError as e:
        raise _fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", run_mod.EXIT_FATAL)


@app.command(epilog=EXIT_CODES_HELP)
def compact(
    output: str = typer.Argument(..., help="Parquet dataset directory written by `pipeline label`."),
    part_size: int = typer.Option(4096, help="Rows per rewritten Parquet part."),
) -> None:
    """Rewrite OUTPUT's parts keeping only the latest row per (image_id, model).

    Takes the lock like `label`; a killed compaction is undone or finished at the next start.
    """
    from .compact import compact as compact_output

    summary = _run_command(lambda: compact_output(output, part_size))
    typer.echo(summary.message or summary.line(), err=True)


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


@app.command()
def models(
    cache_dir: Optional[str] = typer.Option(None, help="Converted weights cache [~/.cache/pipeline]."),
) -> None:
    """List the models: name, input size, parameters, published ImageNet top-1, where the weights
    come from and whether they are on this machine (embedded / cached / needs download)."""
    from .config import RunConfig
    from .models import list_entries

    cfg = RunConfig(**({"cache_dir": cache_dir} if cache_dir else {}))
    rows = [("name", "input", "params", "top-1", "weights", "offline here")]
    for e in list_entries():
        rows.append((e.name, f"{e.input_size}", f"{e.params_millions or '?'}M",
                     f"{e.imagenet_top1 or '?'}%", e.weights_source, e.offline(cfg)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


FINETUNE_EXIT_CODES_HELP = (
    "Exit codes: 0 success; 2 usage error or unusable training data; 3 BUNDLE is locked by "
    "another run; 4 fatal runtime error; 130 interrupted (add --resume to continue from the "
    "last completed epoch)."
)


@app.command(epilog=FINETUNE_EXIT_CODES_HELP)
def finetune(
    data: str = typer.Argument(..., help="Training images: a folder with one subfolder per class, "
                               "or a .csv/.parquet manifest with 'path' and 'label' columns "
                               "(relative paths resolve against the manifest's folder)."),
    bundle: str = typer.Argument(..., help="Bundle directory to write (model.keras, labels.json, "
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
) -> None:
    """Fine-tune a pretrained network on the classes in DATA into BUNDLE.

    Then label with it: `pipeline label INPUT OUTPUT --model BUNDLE`.
    """
    import dataclasses

    from . import run as run_mod
    from .checkpoint import OutputLocked
    from .finetune import FinetuneConfig, TrainingFailed
    from .finetune import finetune as train

    options = dict(base=base, epochs=epochs, val_split=val_split, unfreeze_top=unfreeze_top,
                   batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                   patience=patience, augment_copies=augment_copies, cache_dir=cache_dir)
    try:
        cfg = FinetuneConfig(data=data, bundle=bundle, resume=resume,
                             **{k: v for k, v in options.items() if v is not None})
        _quiet_tensorflow()
        summary = train(cfg)
    except ConfigError as e:
        raise _fail(str(e), run_mod.EXIT_USAGE)
    except OutputLocked as e:
        raise _fail(str(e), run_mod.EXIT_LOCKED)
    except (run_mod.Interrupted, KeyboardInterrupt):
        raise _fail("interrupted; run the same command with --resume to continue after the last "
                    "completed epoch", run_mod.EXIT_INTERRUPTED)
    except TrainingFailed as e:
        raise _fail(str(e), run_mod.EXIT_FATAL)
    except OSError as e:
        raise _fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", run_mod.EXIT_FATAL)
    if json_summary:
        typer.echo(json.dumps(dataclasses.asdict(summary)))
    else:
        typer.echo(summary.line(), err=True)


def main() -> None:
    try:
        app()
    except ConfigError as e:  # raised before a command's own handling (e.g. in a callback)
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
