"""A checkpoint opened for reading: its parameters by flat name ('encoder/layers_0/mlp/wi_0/kernel'),
each a lazy leaf that knows its shape and dtype and reads only what a device asks for.

Readers (T5X msgpack + tensorstore, Orbax, Hugging Face safetensors) build a `Source`; the
restore code (restore.py) asks it for each parameter with the sharding the model wants, so a
host only ever reads the slices its own devices hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

Index = tuple[slice, ...]


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      flat.update(flatten(value, name + '/'))
    else:
      flat[name] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


@dataclasses.dataclass
class Leaf:
  """One stored array: shape, dtype and a reader of any rectangular slice."""

  shape: tuple[int, ...]
  dtype: np.dtype
  read: Callable[[Index], np.ndarray]

  @classmethod
  def from_array(cls, array) -> Leaf:
    array = np.asarray(array)
    return cls(tuple(array.shape), array.dtype, lambda index: array[index])


def place(leaf: Leaf, sharding: jax.sharding.Sharding, dtype=None) -> jax.Array:
  """The leaf as a global array with `sharding`: each device's slice is read (and cast) alone."""
  dtype = np.dtype(dtype or leaf.dtype)

  def shard(index: Index) -> np.ndarray:
    return np.asarray(leaf.read(index)).astype(dtype, copy=False)

  return jax.make_array_from_callback(leaf.shape, sharding, shard)


@dataclasses.dataclass
class Source:
  """Parameters of one checkpoint. `load` places a group of leaves; subclasses that read many
  leaves faster at once (Orbax) override it."""

  path: str
  format: str
  leaves: dict[str, Leaf]
  step: int | None = None

  def __iter__(self) -> Iterator[str]:
    return iter(self.leaves)

  def load(self, requests: Mapping[str, tuple[jax.sharding.Sharding, Any]]
           ) -> dict[str, jax.Array]:
    """{name: (sharding, dtype)} -> {name: global array}."""
    return {name: place(self.leaves[name], sharding, dtype)
            for name, (sharding, dtype) in requests.items()}

  def describe(self) -> str:
    step = '' if self.step is None else f', step {self.step}'
    return f'{self.format} checkpoint {self.path} ({len(self.leaves)} arrays{step})'


def from_tree(path: str, fmt: str, tree: Mapping[str, Any], step: int | None = None) -> Source:
  """A Source over in-memory arrays (Hugging Face tensors already mapped to our names)."""
  return Source(str(path), fmt, {k: Leaf.from_array(v) for k, v in flatten(tree).items()}, step)
