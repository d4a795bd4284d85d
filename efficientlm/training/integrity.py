"""Content checksums of checkpointed arrays, and a sealed (self-checksummed) metadata record.

Orbax and tensorstore do not verify what they read back: a flipped byte in a data file restores
as a wrong value without a word. So every saved array gets a 64-bit checksum of its bits,
computed on the devices before the save and recorded in the checkpoint's `meta` item; a restore
recomputes it on whatever mesh the arrays land on and compares.

The checksum of an array x with n elements, each read as unsigned 32-bit words w_i (bf16 and
int8 zero-extended, 64-bit types as two words) at flat position i, is, for two seeds s:

    h_s(x) = sum_i fmix32(w_i XOR fmix32(i * 0x9E3779B9 + s))   (mod 2^32)

where fmix32 is MurmurHash3's finalizer (a bijection on 32-bit words). The sum is a modular
integer sum, so it does not depend on the order of the reduction, hence not on the sharding
or the device count; every element enters through a position-dependent bijection, so a changed
or moved value changes each lane with probability 1 - 2^-32.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_SEEDS = (0x2545F491, 0x6B43A9B5)


def _fmix32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words, same shape (plus a trailing 2 for 64-bit types)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = np.dtype(x.dtype).itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major element positions (mod 2^32) without reshaping, so sharded arrays stay put."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def array_checksum(x: jax.Array) -> jax.Array:
  """uint32[2]: the two lanes of the checksum above (traceable; use inside jit)."""
  words = _words(x)
  position = _flat_index(words.shape) * jnp.uint32(0x9E3779B9)
  return jnp.stack([jnp.sum(_fmix32(words ^ _fmix32(position + jnp.uint32(seed))),
                            dtype=jnp.uint32) for seed in _SEEDS])


def _all_finite(leaves) -> jax.Array:
  checks = [jnp.all(jnp.isfinite(x)) for x in leaves
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


@jax.jit
def _summarize(leaves: list[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
  return [array_checksum(x) for x in leaves], _all_finite(leaves)


def leaf_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def describe(tree) -> tuple[dict[str, dict[str, Any]], bool]:
  """({leaf name: {'shape', 'dtype', 'checksum'}}, all floating values finite) of a tree of
  (possibly sharded, possibly multi-host) arrays."""
  named = jax.tree_util.tree_flatten_with_path(tree)[0]
  # One jitted computation per set of devices (a state's arrays normally share one mesh).
  groups: dict[tuple, list[int]] = {}
  for i, (_, x) in enumerate(named):
    key = (tuple(sorted(d.id for d in x.sharding.device_set)) if isinstance(x, jax.Array)
           else ())
    groups.setdefault(key, []).append(i)
  sums, finite = [None] * len(named), True
  for members in groups.values():
    group_sums, group_finite = jax.device_get(_summarize([named[i][1] for i in members]))
    finite = finite and bool(group_finite)
    for i, s in zip(members, group_sums):
      sums[i] = f'{int(s[0]):08x}{int(s[1]):08x}'
  table = {leaf_name(path): {'shape': list(x.shape), 'dtype': str(np.dtype(x.dtype)),
                             'checksum': s} for (path, x), s in zip(named, sums)}
  return table, finite


def signature(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{leaf name: (shape, dtype)} of a tree of arrays or ShapeDtypeStructs."""
  return {leaf_name(path): (tuple(x.shape), str(np.dtype(x.dtype)))
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mismatches(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> list[str]:
  """Lines naming each leaf whose shape or dtype differs, or that only one side has."""
  lines = []
  for name in sorted(set(expected) | set(found)):
    if name not in found:
      lines.append(f'{name}: the model has {_fmt(expected[name])}, the checkpoint has none')
    elif name not in expected:
      lines.append(f'{name}: the checkpoint has {_fmt(found[name])}, the model has none')
    elif tuple(expected[name][0]) != tuple(found[name][0]) or expected[name][1] != found[name][1]:
      lines.append(f'{name}: the model has {_fmt(expected[name])}, the checkpoint '
                   f'{_fmt(found[name])}')
  return lines


def _fmt(entry) -> str:
  shape, dtype = entry
  return f'{dtype}{list(shape)}'


# --- the sealed metadata record ------------------------------------------------------------------


def _digest(payload: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def seal(payload: Mapping[str, Any]) -> dict[str, Any]:
  """`payload` with its own sha256, so a damaged record is told from a different one."""
  return {**payload, 'sha256': _digest(payload)}


def unseal(record: Mapping[str, Any]) -> dict[str, Any] | None:
  """The payload of a sealed record; None if the record was written before records were sealed.
  Raises ValueError if the record does not match its checksum."""
  if 'sha256' not in record:
    return None
  payload = {k: v for k, v in record.items() if k != 'sha256'}
  if _digest(payload) != record['sha256']:
    raise ValueError('the checkpoint metadata does not match its checksum')
  return payload
