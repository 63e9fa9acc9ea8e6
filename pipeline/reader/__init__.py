"""The reader stage: ImageRefs -> batches of model input + error records (tf.data).

- graph: the tf.data graph and the sequencing that makes every input come out exactly once
- reading: bounded reads in the graph (through pipeline/inputs.py) and the sha256 of what was read
- checks: the header and structure check (Python) and the JPEG cut check (graph ops)
- decode: one image's bytes -> decoded crop -> model input
- geometry: the per-image plan in Python (crop window, DCT scale), then resize and orientation
- diagnosis: why a dropped input failed, in Python
"""
from __future__ import annotations

from .decode import image_from_bytes, load_image
from .diagnosis import diagnose
from .geometry import SCALED_DECODE_MARGIN, crop_window, dct_ratio
from .graph import Batch, ImageReader, make_dataset

__all__ = ["SCALED_DECODE_MARGIN", "Batch", "ImageReader", "crop_window", "dct_ratio", "diagnose",
           "image_from_bytes", "load_image", "make_dataset"]
