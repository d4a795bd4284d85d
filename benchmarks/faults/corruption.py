"""Damaging one file of a committed checkpoint: flipped bytes or a truncation, recorded exactly.

Files are drawn by kind (weights below), so the array data, the OCDBT index (the merged one the
restore reads, and the per-process manifests it supersedes), Orbax's metadata, the trainer's
sealed meta record and the data iterator's files are all hit. Within the array data (the
per-process OCDBT files: a few large data files and small b-tree nodes, which the merged index
supersedes) a file is drawn by its size, as a random byte of the data would be; in the other
kinds every file is equally likely. A pristine copy of the step is kept outside
MODEL_DIR first, for the independent check (independent.py) and for the record.
"""

from __future__ import annotations

import pathlib
import random
import shutil

ARRAY_DATA = 'array data (per-process OCDBT files)'
# (kind, weight, does this checkpoint-relative path belong to it)
KINDS = (
    (ARRAY_DATA, 3.0, lambda p: p.parts[0] in ('params', 'opt_state') and
     p.parts[1].startswith('ocdbt.process_') and 'd' in p.parts),
    ('OCDBT index', 2.0, lambda p: p.parts[0] in ('params', 'opt_state') and
     (p.name == 'manifest.ocdbt' or p.parts[1] == 'd')),
    ('Orbax metadata', 2.0, lambda p: p.name in ('_METADATA', '_sharding', '_CHECKPOINT_METADATA')
     or 'array_metadatas' in p.parts),
    ('meta record', 1.5, lambda p: p.parts[0] == 'meta' and p.name == 'metadata'),
    ('data iterator', 1.5, lambda p: p.parts[0] == 'dataset' and p.name != 'commit_success.txt'),
    ('commit marker', 0.5, lambda p: p.name == 'commit_success.txt'),
)
FLIP_PROBABILITY = 0.6  # else truncate


def kind_of(relative: pathlib.Path) -> str:
  for kind, _, belongs in KINDS:
    if belongs(relative):
      return kind
  return 'other'


def choose_file(step_dir: pathlib.Path, rng: random.Random) -> pathlib.Path:
  """A non-empty file of the step, drawn by kind. Files are ordered by size first: Orbax names
  data files by random hashes, sizes are the same in every run, so a seed picks the same file."""
  files = [p.relative_to(step_dir) for _, p in sorted(
      (p.stat().st_size, p) for p in step_dir.rglob('*') if p.is_file() and p.stat().st_size > 0)]
  by_kind: dict[str, list[pathlib.Path]] = {}
  for f in files:
    by_kind.setdefault(kind_of(f), []).append(f)
  kinds = [(k, w) for k, w, _ in KINDS if k in by_kind] + (
      [('other', 0.5)] if 'other' in by_kind else [])
  kind = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
  sizes = [(step_dir / f).stat().st_size if kind == ARRAY_DATA else 1 for f in by_kind[kind]]
  return step_dir / rng.choices(by_kind[kind], weights=sizes)[0]


def keep_pristine(step_dir: pathlib.Path, where: pathlib.Path) -> pathlib.Path:
  shutil.copytree(step_dir, where)
  return where


def damage(path: pathlib.Path, rng: random.Random) -> dict:
  """Flips 1-64 consecutive bytes (each XORed with a random non-zero byte) at a random offset,
  or truncates the file to a random shorter length. Returns what was done."""
  data = bytearray(path.read_bytes())
  size = len(data)
  if rng.random() < FLIP_PROBABILITY:
    count = min(rng.randint(1, 64), size)
    offset = rng.randrange(0, size - count + 1)
    masks = bytes(rng.randrange(1, 256) for _ in range(count))
    for i, mask in enumerate(masks):
      data[offset + i] ^= mask
    path.write_bytes(bytes(data))
    return {'op': 'flip', 'file_size': size, 'offset': offset, 'count': count,
            'xor_masks': masks.hex()}
  length = rng.randrange(0, size)
  with open(path, 'r+b') as f:
    f.truncate(length)
  return {'op': 'truncate', 'file_size': size, 'new_size': length}
