"""TensorFlow for input pipelines only: every TF-using module here imports `tf` from this one.

TF grabs all GPU memory when it first touches a GPU; the model runs in JAX, so TF sees none.
Importing TF (or seqio, TFDS) does not initialize its devices, so this works as long as it runs
before the first TF op, whichever module imported TF first.
"""

from __future__ import annotations

import logging
import os

# TF's C++ INFO lines (oneDNN notes, CUDA stub probes) say nothing about the input pipeline;
# warnings and errors still show. A value the user set wins.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  logging.warning('TensorFlow ran an op before efficientlm.data could hide the GPUs from it; it '
                  'may hold GPU memory that JAX needs.')

__all__ = ['tf']
