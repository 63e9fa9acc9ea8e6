"""The output store: one interface over a local OUTPUT directory and an s3:// OUTPUT prefix,
owning OUTPUT's layout (layout.py), its data files' contract (schema.py, parts.py), the lock
and fencing (lock.py), replacements and recovery (replace.py) and the latest-row rule
(latest.py). Nobody else builds an OUTPUT path or asks whether OUTPUT is on S3.

    out = store.open_output(output, s3)
    with out.lock("label", lease=600) as lease:
        replace.recover(out)
        for f in out.data_files(): ...          # StoredFile(name, size), in commit order
        out.write_file(layout.part_name(run_id, 0), write)   # fenced: LeaseLost if taken over
"""
from __future__ import annotations

from .. import storage
from ..types import S3Options
from .base import Lease, OutputError, Store, StoredFile
from .lock import LeaseLost, OutputLocked

__all__ = ["Lease", "LeaseLost", "OutputError", "OutputLocked", "Store", "StoredFile",
           "open_output"]


def open_output(output: str, s3: S3Options = S3Options()) -> Store:
    """The store of OUTPUT (a local path or an s3:// URI); `s3`: how to reach it on S3."""
    if storage.is_s3(output):
        from .s3 import S3Store

        return S3Store(output, s3)
    from .local import LocalStore

    return LocalStore(output)
