"""pipeline: bulk, offline, resumable ImageNet labeling into Parquet."""
__version__ = "0.1.0"


def latest(output: str, columns=None):
    """OUTPUT's current rows, one per (image_id, model), as a pyarrow Table (see results.latest)."""
    from . import results

    return results.latest(output, columns)


def latest_batches(output: str, columns=None):
    """OUTPUT's current rows as a pyarrow RecordBatchReader, in bounded memory, for outputs of
    any size (see results.latest_batches)."""
    from . import results

    return results.latest_batches(output, columns)
