"""Magnitude pruning, the baseline SparseGPT is compared with (Frantar & Alistarh 2023, section 4,
after Zhu & Gupta 2017): zero the smallest |w| without looking at data, no weight update.

  unstructured s   the round(s x size) smallest |w| of the whole kernel (per layer, as the
                   paper's baseline; per expert for stacked expert kernels);
  n:m              the n smallest |w| of every group of m consecutive inputs, per output;
  int8             the kept weights are then rounded to the project's int8 grid (round to
                   nearest with per-output-channel absmax scales of the pruned kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from efficientlm.compression.spec import PruneSpec, smallest, smallest_per_row, to_int8_grid


def prune(kernel: jax.Array, spec: PruneSpec) -> tuple[jax.Array, jax.Array]:
  """(pruned kernel [in, out] float32, mask [in, out], True = pruned)."""
  # Only n and m are static: one program serves every unstructured sparsity and int8 setting.
  return _prune(kernel, jnp.float32(spec.sparsity), jnp.bool_(spec.int8),
                PruneSpec(n=spec.n, m=spec.m))


@functools.partial(jax.jit, static_argnames=('spec',))
def _prune(kernel, sparsity, int8, spec: PruneSpec):
  w = kernel.astype(jnp.float32)
  if spec.semi_structured:
    cols, rows = w.shape
    groups = jnp.abs(w.T).reshape(rows * cols // spec.m, spec.m)
    mask = smallest_per_row(groups, spec.n).reshape(rows, cols).T
  else:
    mask = smallest(jnp.abs(w), jnp.round(sparsity * w.size))
  pruned = jnp.where(mask, 0.0, w)
  return jnp.where(int8, to_int8_grid(pruned), pruned), mask
