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
from .config import RunConfig, build_config, read_toml
from .finetune.config import FinetuneConfig
from .options import cli_option, with_cli_options

log = logging.getLogger(__name__)

EXIT_CODES_HELP = exitcodes.HELP


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
@with_cli_options(RunConfig)
def label(
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="TOML file (e.g. configs/nightly.toml); flags override it."),
    debug: bool = typer.Option(False, "--debug", help="On an unexpected error, print the "
                               "traceback here too (it is always in OUTPUT/_runs/<run_id>.log)."),
    **flags,
) -> None:
    """Label every image under INPUT into OUTPUT (one Parquet row per image).

    Re-running the same command resumes: images already in OUTPUT (same id, size and mtime)
    are skipped, so a nightly job labels only what is new. A changed file is labeled again.
    """
    def start():
        cfg = build_config(read_toml(config) if config else {}, flags, source=str(config))
        _quiet_tensorflow()
        from . import run

        return cfg, run.label(cfg)

    cfg, summary = _run_command(start, debug=debug)
    _print_summary(summary, cfg.json)
    raise typer.Exit(summary.exit_code)


def _run_command(start, interrupted_message: str = exitcodes.INTERRUPTED_MESSAGE,
                 debug: bool = False):
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
        if interrupts.disguised(e):
            e = interrupts.Interrupted("signal")
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
    s3_endpoint: Optional[str] = cli_option(RunConfig, "s3_endpoint", "S3-compatible endpoint URL."),
    s3_region: Optional[str] = cli_option(RunConfig, "s3_region"),
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
    max_pixels: Optional[int] = cli_option(
        RunConfig, "max_pixels", "Source images above this many pixels (by their header) get a "
        "placeholder."),
    max_file_bytes: Optional[int] = cli_option(
        RunConfig, "max_file_bytes", "Source files above this many bytes are not read."),
    s3_endpoint: Optional[str] = cli_option(RunConfig, "s3_endpoint", "S3-compatible endpoint URL."),
    s3_region: Optional[str] = cli_option(RunConfig, "s3_region"),
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
        limits = ReadLimits(max_pixels or ReadLimits.max_pixels,
                            max_file_bytes or ReadLimits.max_file_bytes)
        return write_report(output, html, options, limits, S3Options(s3_endpoint, s3_region))

    summary = _run_command(start, "interrupted, the report was not written", debug=debug)
    typer.echo(summary.line(), err=True)


def _print_summary(summary, as_json: bool) -> None:
    import dataclasses

    if as_json:
        if not _print_stdout(json.dumps(dataclasses.asdict(summary))):
            log.warning(f"stdout was closed before the summary could be printed; it is in "
                        f"the run manifest, OUTPUT/_runs/{summary.run_id}.json")
        return
    typer.echo(summary.line(), err=True)
    if summary.errors_by_kind:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(summary.errors_by_kind.items()))
        typer.echo(f"errors by kind: {kinds}", err=True)
    if summary.message:
        typer.echo(summary.message, err=True)


@app.command(cls=_Command)
def models(cache_dir: Optional[str] = cli_option(RunConfig, "cache_dir")) -> None:
    """List the models: name, input size, parameters, published ImageNet top-1, where the weights
    come from and whether they are on this machine (embedded / cached / needs download)."""
    def table():
        from .models import ModelRequest, list_entries

        request = ModelRequest(cache_dir=cache_dir) if cache_dir else ModelRequest()
        return [(e.name, f"{e.input_size}", f"{e.params_millions or '?'}M",
                 f"{e.imagenet_top1 or '?'}%", e.weights_source, e.offline(request))
                for e in list_entries()]

    rows = [("name", "input", "params", "top-1", "weights", "offline here"), *_run_command(table)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    _print_stdout("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                             for r in rows))  # `| head -3` is fine


FINETUNE_EXIT_CODES_HELP = (
    "Exit codes: 0 success; 2 usage error or unusable training data; 3 BUNDLE is locked by "
    "another run; 4 fatal runtime error; 130 interrupted (add --resume to continue from the "
    "last completed epoch)."
)


@app.command(cls=_Command, epilog=FINETUNE_EXIT_CODES_HELP)
@with_cli_options(FinetuneConfig)
def finetune(
    json_summary: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    debug: bool = typer.Option(False, "--debug", help="On an unexpected error, print the traceback."),
    **flags,
) -> None:
    """Fine-tune a pretrained network on the classes in DATA into BUNDLE.

    Then label with it: `pipeline label INPUT OUTPUT --model BUNDLE`.
    """
    import dataclasses

    def start():
        from .finetune import finetune as train

        cfg = FinetuneConfig(**{k: v for k, v in flags.items() if v is not None})
        _quiet_tensorflow()
        return train(cfg)

    summary = _run_command(start, "interrupted; run the same command with --resume to continue "
                           "after the last completed epoch", debug=debug)
    if json_summary:
        if not _print_stdout(json.dumps(dataclasses.asdict(summary))):
            log.warning("stdout was closed before the summary could be printed")
    else:
        typer.echo(summary.line(), err=True)


def _print_stdout(text: str) -> bool:
    """Print a line on stdout; False if its reader has gone (`| head` that ended, a closed pipe).
    The command's exit code stays its own: the work is done whether or not someone reads this.
    stdout then goes to /dev/null, so the final flush cannot fail again."""
    try:
        typer.echo(text)
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        return False


def _open_closed_std_streams() -> None:
    """A stdin, stdout or stderr that the caller closed (`>&-`) becomes /dev/null. Else the next
    file opened takes its number, and what native code prints there (TensorFlow, the LiteRT
    converter) lands in that file; and Python's sys.stdout would be None."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


def main() -> None:
    """Run the CLI, then leave with os._exit once Python's own exit handlers have run: native
    threads of TensorFlow or Arrow still alive in C++ static destructors can abort the process
    ("terminate called without an active exception"), turning a clean exit code into -6."""
    _open_closed_std_streams()
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
