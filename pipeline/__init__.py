"""pipeline: bulk, offline, resumable ImageNet labeling into Parquet."""
__version__ = "0.1.0"
