"""Import TensorFlow once, without the C++ start-up chatter that drowns a cron mail."""
from __future__ import annotations

import os
import sys
import tempfile


def import_tensorflow_quietly():
    """Import tensorflow and enumerate devices with fd 2 muted; show the text if import fails.

    The oneDNN / CUDA-driver notices are written before TF's own log level applies, so the
    TF_CPP_MIN_LOG_LEVEL variable alone cannot silence them.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return tf
