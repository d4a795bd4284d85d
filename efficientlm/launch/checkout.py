"""Packs the local checkout (what git would commit: tracked and untracked, not ignored files) into
a tarball for the TPU VM workers, so they run exactly the code and configs here."""

from __future__ import annotations

import pathlib
import subprocess
import tarfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def archive_path(source_dir: pathlib.Path, name: str) -> pathlib.Path:
  return source_dir / 'build' / f'efficientlm-{name}.tar.gz'  # build/ is git-ignored


def pack(source_dir: pathlib.Path, archive: pathlib.Path) -> int:
  """Writes `archive`; returns the number of files."""
  listing = subprocess.run(
      ['git', '-C', str(source_dir), 'ls-files', '-z', '--cached', '--others',
       '--exclude-standard'], check=True, capture_output=True).stdout.decode()
  files = [f for f in listing.split('\0') if f and (source_dir / f).is_file()]  # not deleted
  if 'setup.py' not in files:
    raise ValueError(f'{source_dir} is not an efficientlm checkout (no setup.py in git ls-files).')
  archive.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(archive, 'w:gz') as tar:
    for f in files:
      tar.add(source_dir / f, arcname=f)
  return len(files)
