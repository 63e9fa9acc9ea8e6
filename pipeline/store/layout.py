"""OUTPUT's layout: every name a labeling OUTPUT holds, and nothing else (no I/O).

  part-<run_id>-<seq>.parquet   data files: what `label` (and `compact`) commit
  _runs/<run_id>.json|.log      run manifests, and the traceback of a run that failed
  _lock                         who holds the output (flock'ed locally, a lease object on S3)
  _overwrite-<id>.json          markers of a replacement in progress (see replace.py)
  _compact-<id>.json
  _staged-<name>.staged         a replacement's new file before it is published
  _tmp-...                      a local write in progress (atomic.py)
  _index/                       indexes kept beside the data files (their writers own the names)

Readers of the dataset see only `part-*.parquet`: everything else starts with `_`.
Names are relative to OUTPUT with `/` between a directory and a file.
"""
from __future__ import annotations

from ..atomic import TMP_PREFIX

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
RUNS = "_runs"
INDEX = "_index"
LOCK = "_lock"
STAGED_PREFIX = "_staged-"
MARKER_KINDS = ("overwrite", "compact")


def part_name(run_id: str, seq: int) -> str:
    """The name of the `seq`-th data file a run (or a compaction) commits."""
    return f"{PART_PREFIX}{run_id}-{seq:05d}{PART_SUFFIX}"


def is_data_file(name: str) -> bool:
    """A data file readers of the dataset see (a name directly in OUTPUT)."""
    return name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX) and "/" not in name


def run_manifest(run_id: str) -> str:
    return f"{RUNS}/{run_id}.json"


def run_log(run_id: str) -> str:
    return f"{RUNS}/{run_id}.log"


def is_run_manifest(name: str) -> bool:
    return name.endswith(".json")


def index_file(name: str) -> str:
    """Where an index file named `name` lives (beside the parts, hidden from readers)."""
    return f"{INDEX}/{name}"


def marker(kind: str, replacement_id: str) -> str:
    return f"_{kind}-{replacement_id}.json"


def marker_kind(name: str) -> str | None:
    """'overwrite' or 'compact' if `name` is a replacement marker, else None."""
    kind = name[1:].split("-", 1)[0]
    if name.startswith("_") and kind in MARKER_KINDS and name.endswith(".json"):
        return kind
    return None


def staged_name(name: str) -> str:
    return f"{STAGED_PREFIX}{name}.staged"


def staged_prefix(run_id: str) -> str:
    """What the staged names of a run's (or a compaction's) data files start with."""
    return f"{STAGED_PREFIX}{PART_PREFIX}{run_id}-"


def is_leftover(name: str) -> bool:
    """A temp or staged file: only a killed run leaves one behind (under the lock, at start)."""
    return name.startswith((TMP_PREFIX, STAGED_PREFIX))


def join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name
