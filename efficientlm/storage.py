"""Run directories (MODEL_DIR and what is under it), local or on cloud storage.

Multi-host TPU runs keep MODEL_DIR on Cloud Storage (gs://BUCKET/PATH), which every host can
write. pathlib would fold 'gs://b' into the local path 'gs:/b', so directories go through
etils.epath, which keeps the URL scheme (and reads it through tf.io.gfile).
"""

from __future__ import annotations

import os
import pathlib

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
  return '://' in str(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: URLs (gs://) kept as they are, local paths made absolute (Orbax
  needs absolute paths)."""
  if isinstance(path, pathlib.PurePath) and not isinstance(path, epath.Path) and (
      str(path).startswith('gs:/')):
    raise ValueError(f'{path!s} looks like a gs:// URL that pathlib has folded; pass the string.')
  text = os.fspath(path)
  return epath.Path(text if is_url(text) else os.path.abspath(text))
