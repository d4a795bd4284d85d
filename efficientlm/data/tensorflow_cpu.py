"""TensorFlow for input pipelines only: every module here imports this one before TF, seqio or
TFDS, and TF-using modules take `tf` from it.

- TF grabs all GPU memory when it first touches a GPU; the model runs in JAX, so TF sees none.
  Importing TF does not initialize its devices, so hiding them works as long as it happens before
  the first TF op.
- TF 2.21 prints INFO lines while it loads, before its logging reads TF_CPP_MIN_LOG_LEVEL: that
  oneDNN is on, that no CUDA driver was found (on a CPU machine), "All log messages before
  absl::InitializeLog() ...". They say nothing about the input pipeline and alarm users of CPU
  machines, so exactly those lines are dropped from what TF writes to stderr during its import;
  everything else it writes (warnings, errors, a crash) is passed on as it is written.
- On a machine without an NVIDIA driver, TF's first op still calls cuInit and logs its failure
  as an ERROR ("failed call to cuInit ... (303)"), which there only restates that the machine has
  no GPU. There TF's devices are initialized during the import, with that one line dropped; with
  a driver present a cuInit failure is real, and the devices are hidden instead (no filter).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import logging
import os
import re
import sys
import threading

# TF's C++ INFO lines after start-up (CPU feature notes, ...); warnings and errors still show.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
# oneDNN speeds up TF's float kernels (convolutions, matmuls), which input pipelines do not run;
# with it on, TF's int64 ops log "oneDNN supports DT_INT64 only on platforms with AVX-512" as an
# ERROR on TFDS pipelines. Off: TF's own kernels. A value the user set wins.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

_START_UP_INFO = (
    r'^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR'
    r'|I\d{4} [\d:. ]+\d+ (port\.cc:\d+\] oneDNN custom operations are on'
    r'|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine))')
_NO_DRIVER_CUINIT = (r'^E\d{4} [\d:. ]+\d+ cuda_platform\.cc:\d+\] failed call to cuInit: '
                     r'INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR \(303\)')


def _has_nvidia_driver() -> bool:
  return os.path.exists('/proc/driver/nvidia') or ctypes.util.find_library('cuda') is not None


def _forward(source: int, target: int, dropped: re.Pattern) -> None:
  with os.fdopen(source, 'rb') as lines:
    for line in lines:
      if not dropped.match(line.decode(errors='replace')):
        os.write(target, line)


@contextlib.contextmanager
def _filtered_stderr(dropped: re.Pattern):
  """File descriptor 2 through a pipe whose forwarder drops the lines `dropped` matches."""
  sys.stderr.flush()
  read, write = os.pipe()
  saved = os.dup(2)
  forwarder = threading.Thread(target=_forward, args=(read, saved, dropped), daemon=True)
  forwarder.start()
  os.dup2(write, 2)
  os.close(write)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)  # closes the pipe's last writer: the forwarder drains it and ends
    forwarder.join()
    os.close(saved)


def _import_tensorflow():
  """`import tensorflow` and, without a driver, its device initialization, with the lines
  described above filtered out of file descriptor 2. If TF was imported before (a script that
  imported seqio first), only the device initialization is filtered."""
  driver = _has_nvidia_driver()
  dropped = re.compile(_START_UP_INFO if driver else f'{_START_UP_INFO}|{_NO_DRIVER_CUINIT}')
  with _filtered_stderr(dropped):
    import tensorflow  # pylint: disable=g-import-not-at-top
    if not driver:
      tensorflow.config.list_logical_devices()  # TF's devices, now: its cuInit probe included
  return tensorflow


tf = _import_tensorflow()

if _has_nvidia_driver():
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    logging.warning('TensorFlow ran an op before efficientlm.data could hide the GPUs from it; it '
                    'may hold GPU memory that JAX needs.')

__all__ = ['tf']
