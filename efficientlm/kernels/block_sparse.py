"""Block-sparse attention masks for `flash_attention(block_mask=...)`.

A block mask is bool [num_q_blocks, num_k_blocks]: entry (i, j) lets query rows
[i * block_q, (i + 1) * block_q) read key columns [j * block_k, (j + 1) * block_k). It must be
built with the block_q / block_k that flash_attention is called with; the kernels skip False
blocks (no load, no compute), and it combines (AND) with causal, window and segment masks.
A query row whose blocks are all False sees no key and outputs 0, like other fully masked rows.

`bigbird_block_mask` builds the BigBird pattern (Zaheer et al. 2020): sliding window of blocks +
global blocks + random blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def num_blocks(length: int, block: int) -> int:
  return -(-length // block)


def bigbird_block_mask(num_q_blocks: int,
                       num_k_blocks: int,
                       *,
                       window_blocks: int = 1,
                       num_global: int = 1,
                       num_random: int = 1,
                       seed: int | Sequence[int] = 0,
                       causal: bool = False) -> np.ndarray:
  """Bool [num_q_blocks, num_k_blocks], the BigBird pattern for self-attention.

  local: query block i reads key blocks j with |i - j| <= window_blocks (block i of the
    queries faces block i of the keys);
  global: the first num_global query blocks read everything and the first num_global key blocks
    are read by everyone;
  random: every other query block also reads num_random key blocks drawn without replacement
    from those it does not read yet (numpy generator seeded with seed, so the mask is static;
    a sequence of ints, e.g. (seed, layer, head), seeds it through numpy's SeedSequence).
  causal: everything above is restricted to key blocks j <= i (a global query block reads its
    past only) and random blocks are drawn from the past blocks not read yet; where fewer are
    left, the row gets them all. The token-level causal mask inside the diagonal block is the
    caller's (flash_attention(causal=True) ANDs it).

  This is the one definition of the pattern: `layers.bigbird` derives its gather lists from it.
  """
  if min(num_q_blocks, num_k_blocks) < 1 or min(window_blocks, num_global, num_random) < 0:
    raise ValueError(f'bigbird_block_mask: need positive block counts and non-negative '
                     f'window_blocks/num_global/num_random; got {num_q_blocks}, {num_k_blocks}, '
                     f'{window_blocks}, {num_global}, {num_random}.')
  rows = np.arange(num_q_blocks)[:, None]
  cols = np.arange(num_k_blocks)[None, :]
  mask = np.abs(rows - cols) <= window_blocks
  mask |= (rows < num_global) | (cols < num_global)
  allowed = cols <= rows if causal else np.ones_like(mask)
  mask &= allowed
  rng = np.random.default_rng(seed)
  for i in range(num_global, num_q_blocks):
    free = np.flatnonzero(~mask[i] & allowed[i])
    mask[i, rng.choice(free, size=min(num_random, free.size), replace=False)] = True
  return mask


def expand_block_mask(block_mask: jax.Array, q_len: int, k_len: int, block_q: int,
                      block_k: int) -> jax.Array:
  """Token-level bool [q_len, k_len] of a block mask (what the XLA path applies)."""
  full = jnp.repeat(jnp.repeat(jnp.asarray(block_mask, bool), block_q, axis=0), block_k, axis=1)
  return full[:q_len, :k_len]


def check_block_mask(block_mask, q_len: int, k_len: int, block_q: int, block_k: int) -> None:
  want = (num_blocks(q_len, block_q), num_blocks(k_len, block_k))
  if tuple(block_mask.shape) != want:
    raise ValueError(
        f'block_mask has shape {tuple(block_mask.shape)}, but q_len={q_len}, k_len={k_len} in '
        f'blocks of block_q={block_q}, block_k={block_k} need {want}; build the mask with the '
        f'block sizes passed to flash_attention.')
  if not (jnp.issubdtype(block_mask.dtype, jnp.bool_) or
          jnp.issubdtype(block_mask.dtype, jnp.integer)):
    raise ValueError(f'block_mask must be bool (or 0/1 integers), got {block_mask.dtype}.')
