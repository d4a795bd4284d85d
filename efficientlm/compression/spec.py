"""What a pruning run removes: the sparsity pattern and the optional int8 weight grid.

Patterns (Frantar & Alistarh 2023, "SparseGPT", sections 3.2-3.3):
  unstructured s   a fraction s of the kernel's weights is zero (s in [0, 1));
  n:m              in every group of m consecutive inputs of every output, n weights are zero
                   (2:4 and 4:8 are both 50%; groups run along the input, i.e. the contracted,
                   dimension, as sparse tensor cores want them).
With `int8`, the weights that stay are also rounded to the project's int8 grid
(efficientlm.inference.quantization: symmetric, one scale per output channel), jointly with the
pruning as in the paper's section 3.5.

The spec is parsed from one value, `sparsity`: a float for unstructured sparsity or a string
'n:m', so that no option exists that another one silently overrides.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from efficientlm.errors import ConfigError
from efficientlm.inference import quantization

METHODS = ('sparsegpt', 'magnitude')
_NM = re.compile(r'^\s*(\d+)\s*:\s*(\d+)\s*$')


@dataclasses.dataclass(frozen=True)
class PruneSpec:
  """sparsity: unstructured fraction (used when m == 0); n, m: n zeros in every m inputs;
  block_size: SparseGPT's lazy-update and mask-selection block (columns); dampening: lambda as a
  fraction of the mean Hessian diagonal."""

  sparsity: float = 0.0
  n: int = 0
  m: int = 0
  int8: bool = False
  block_size: int = 128
  dampening: float = 0.01

  def __post_init__(self):
    if self.m or self.n:
      if not 0 < self.n < self.m:
        raise ConfigError(f'n:m sparsity {self.n}:{self.m} needs 0 < n < m (n zeros in every m '
                          "consecutive inputs), e.g. --gin.SPARSITY=\"'2:4'\" or \"'4:8'\".")
    elif not 0.0 <= self.sparsity < 1.0:
      raise ConfigError(f'SPARSITY = {self.sparsity} is outside [0, 1): it is the fraction of '
                        'weights set to zero, e.g. --gin.SPARSITY=0.5 (or an n:m pattern such as '
                        "--gin.SPARSITY=\"'2:4'\").")
    if self.block_size < 1:
      raise ConfigError(f'block_size = {self.block_size}; it must be a positive number of input '
                        'columns (the paper uses 128).')
    if not 0.0 <= self.dampening:
      raise ConfigError(f'dampening = {self.dampening}; it must be >= 0 (the paper uses 0.01).')

  @classmethod
  def parse(cls, sparsity: float | str, **kwargs) -> PruneSpec:
    """From `sparsity` = 0.5 (unstructured) or '2:4' (n:m)."""
    if isinstance(sparsity, str):
      match = _NM.match(sparsity)
      if match is None:
        raise ConfigError(f'SPARSITY = {sparsity!r} is neither a fraction nor an n:m pattern: use '
                          "e.g. --gin.SPARSITY=0.5 or --gin.SPARSITY=\"'2:4'\".")
      return cls(n=int(match[1]), m=int(match[2]), **kwargs)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
      raise ConfigError(f'SPARSITY = {sparsity!r}: give a fraction such as 0.5 or an n:m pattern '
                        "such as '2:4'.")
    return cls(sparsity=float(sparsity), **kwargs)

  @property
  def semi_structured(self) -> bool:
    return self.m > 0

  @property
  def target_sparsity(self) -> float:
    return self.n / self.m if self.semi_structured else self.sparsity

  def describe(self) -> str:
    pattern = f'{self.n}:{self.m}' if self.semi_structured else f'{self.sparsity:.0%} unstructured'
    return pattern + (' + int8' if self.int8 else '')

  def check_kernel(self, name: str, in_features: int) -> None:
    """n:m groups must tile the input dimension."""
    if self.semi_structured and in_features % self.m:
      raise ConfigError(f'{self.describe()} sparsity groups {self.m} consecutive inputs, but '
                        f'{name} has {in_features} inputs, which {self.m} does not divide: '
                        'choose an m that divides every pruned layer\'s input dimension, or '
                        'leave that layer kind out (PRUNE_LAYER_KINDS).')

  def block(self, in_features: int) -> int:
    """The column block: block_size, lowered to a multiple of m so n:m groups never straddle
    two blocks, and at most the input dimension."""
    size = min(self.block_size, in_features)
    if self.semi_structured:
      size = max(self.m, size // self.m * self.m)
    return size


def smallest(scores: jax.Array, k) -> jax.Array:
  """Boolean mask of exactly the k smallest entries of `scores` (ties: lower index first); k may
  be traced."""
  flat = scores.reshape(-1)
  ranks = jnp.argsort(jnp.argsort(flat, stable=True))
  return (ranks < k).reshape(scores.shape)


def smallest_per_row(scores: jax.Array, k: int) -> jax.Array:
  """Boolean mask of the k smallest entries of each row of scores [rows, cols]."""
  ranks = jnp.argsort(jnp.argsort(scores, axis=1, stable=True), axis=1)
  return ranks < k


def channel_scales(kernel: jax.Array) -> jax.Array:
  """The int8 scale of each output channel of kernel [in, out]: [out] (quantization.quantize's)."""
  return quantization.quantize(kernel).scale[0]


def to_int8_grid(kernel: jax.Array) -> jax.Array:
  """kernel [..., in, out] rounded as the project's int8 path stores it, in float32: then
  quantization.quantize_tree of the result gives back the same int8 values (and scales up to
  float rounding), because every channel's largest weight sits on +-127 of its own scale."""
  return quantization.quantize(kernel).dequantize(jnp.float32)
