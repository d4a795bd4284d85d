"""SparseGPT on one kernel (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot"), in jnp, float32, jit- and vmap-able.

The layer-wise problem (section 3): given the layer's calibration inputs X [in, tokens] and
H = 2 X X^T / tokens, find W' with the wanted sparsity minimising ||W X - W' X||^2. With the
paper's W [out, in] (our kernel is its transpose), each row w is a separate problem with the
same Hessian H, and the Optimal Brain Surgeon update for zeroing (or quantizing) weight i while
the weights right of it stay free is

  err_i = (w_i - q_i) / [H_F^-1]_ii,     w_F <- w_F - err_i (H_F^-1)_{i, F}       (3.1)

where F = {i, i+1, ...} is the set of columns not yet processed. Columns are processed left to
right, so every H_F^-1 is a trailing block of one matrix: the rows of the upper Cholesky factor
U of H^-1 (H^-1 = U^T U) give (H_F^-1)_{i, F} / sqrt([H_F^-1]_ii) = U_{i, F}, and with U in
place of H_F^-1 the update reads err_i = (w_i - q_i) / U_ii, w_F -= err_i U_{i, F} (3.4). (U is
computed from one Cholesky factorisation of H with its rows and columns reversed; see
inverse_hessian_factor.)

Implementation as the paper's Algorithm 1 (section 3.4):
- dead inputs (H_ii = 0: the input is always 0) get H_ii = 1 and their weights are zeroed;
- dampening: H += lambda I with lambda = dampening x mean(diag H) (default 1%);
- lazy batch updates: columns are handled in blocks of B (128); within a block the update above
  is applied to the block only, and the block's accumulated errors update the rest of W with one
  matmul, W[:, i2:] -= Err1 U[i1:i2, i2:] (mathematically the same as updating column by column;
  here one scan over equal blocks, the input dim padded with identity-factor columns);
- adaptive mask selection (3.2): unstructured masks are chosen per block, by the OBS saliency
  w^2 / U_ii^2 of the block's (already updated) weights, the smallest fraction s of the block;
- n:m (3.3): at the first column of each group of m, the n smallest saliencies of the group, per
  row, are pruned;
- joint int8 (3.5): q_i is the kept weight rounded to a fixed per-output-channel int8 grid (the
  original kernel's scales, absmax / 127), and the error of the rounding is compensated too.

Deviations: the unstructured mask takes exactly round(s x block size x rows) weights per block
(the authors' threshold takes any ties with it); and with int8, the result is finally put on the
project's own int8 grid (spec.to_int8_grid: scales from the pruned kernel), so that
efficientlm.inference.quantization.quantize_tree stores exactly these weights. That changes
nothing in channels whose largest weight still lies on +-127, and moves the others onto a finer
grid by at most half a step of it. `mask` (tests, and re-pruning with a known mask) replaces the
mask selection.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from efficientlm.compression.spec import (PruneSpec, channel_scales, smallest, smallest_per_row,
                                          to_int8_grid)


def inverse_hessian_factor(hessian: jax.Array, dampening) -> tuple[jax.Array, jax.Array]:
  """(upper Cholesky factor U of (H + lambda I)^-1, dead inputs) after the dead-input fix."""
  hessian = hessian.astype(jnp.float32)
  diag = jnp.diagonal(hessian)
  dead = diag == 0
  idx = jnp.arange(hessian.shape[0])
  hessian = hessian.at[idx, idx].set(jnp.where(dead, 1.0, diag))
  damp = dampening * jnp.mean(jnp.diagonal(hessian))
  hessian = hessian.at[idx, idx].add(damp)
  # With J the reversal, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is
  # upper triangular with a positive diagonal: the factor, from one Cholesky and one triangular
  # inverse instead of Cholesky, inverse and Cholesky again.
  lower = jax.lax.linalg.cholesky(hessian[::-1, ::-1], symmetrize_input=False)
  inverse = jax.lax.linalg.triangular_solve(lower, jnp.eye(hessian.shape[0], dtype=jnp.float32),
                                            left_side=True, lower=True)
  return inverse[::-1, ::-1], dead


def _prune_block(w1, u1, mask1, spec: PruneSpec, quantize, select_groups: bool):
  """One block of columns: w1 [rows, B] (updated by earlier blocks), u1 = U[i1:i2, i1:i2].
  Returns (the block's final weights, the errors Err1 [rows, B], the block's mask); with
  `select_groups` the n:m mask is chosen group by group as the columns are reached."""
  rows, count = w1.shape
  diag = jnp.diagonal(u1)

  def step(i, carry):
    w1, q1, err1, mask1 = carry
    if select_groups:  # groups start at 0 in every block (the block is a multiple of m)
      weights = jax.lax.dynamic_slice_in_dim(w1, i, spec.m, axis=1)
      scale = jax.lax.dynamic_slice_in_dim(diag, i, spec.m)[None]
      chosen = smallest_per_row(weights ** 2 / scale ** 2, spec.n)
      current = jax.lax.dynamic_slice_in_dim(mask1, i, spec.m, axis=1)
      update = jnp.where(i % spec.m == 0, chosen, current)
      mask1 = jax.lax.dynamic_update_slice_in_dim(mask1, update, i, axis=1)
    w = w1[:, i]
    q = quantize(jnp.where(mask1[:, i], 0.0, w))
    err = (w - q) / u1[i, i]
    # Row i of the upper factor is zero left of i: earlier columns are untouched.
    w1 = w1 - err[:, None] * u1[i][None, :]
    return w1, q1.at[:, i].set(q), err1.at[:, i].set(err), mask1

  zeros = jnp.zeros((rows, count), jnp.float32)
  _, q1, err1, mask1 = jax.lax.fori_loop(0, count, step, (w1, zeros, zeros, mask1))
  return q1, err1, mask1


def prune(kernel: jax.Array, hessian: jax.Array, spec: PruneSpec,
          mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(pruned kernel [in, out] float32, its mask [in, out], True = pruned) for kernel [in, out]
  and the Hessian of its inputs [in, in]. `mask` (optional, [in, out]) fixes the mask."""
  # Only the shapes are static (n, m, the block): one program serves every unstructured
  # sparsity, dampening and int8 setting.
  shape_only = PruneSpec(n=spec.n, m=spec.m, block_size=spec.block(kernel.shape[0]))
  return _prune(kernel, hessian, jnp.float32(spec.sparsity), jnp.float32(spec.dampening),
                jnp.bool_(spec.int8), shape_only, mask)


@functools.partial(jax.jit, static_argnames=('spec',))
def _prune(kernel, hessian, sparsity, dampening, int8, spec: PruneSpec, mask):
  kernel = kernel.astype(jnp.float32)
  w = kernel.T  # the paper's W [out, in]
  rows, cols = w.shape
  upper, dead = inverse_hessian_factor(hessian, dampening)
  w = jnp.where(dead[None, :], 0.0, w)
  scale = channel_scales(kernel)
  quantize = lambda q: jnp.where(  # noqa: E731
      int8, jnp.clip(jnp.round(q / scale), -127, 127) * scale, q)
  # Blocks of equal size in one scan: the input dim is padded to a multiple of the block with
  # zero columns whose factor is the identity (dead inputs that are never selected).
  block = spec.block_size
  padded = -(-cols // block) * block
  w = jnp.pad(w, ((0, 0), (0, padded - cols)))
  if padded > cols:
    upper = jax.scipy.linalg.block_diag(upper, jnp.eye(padded - cols, dtype=jnp.float32))
  fixed = None if mask is None else jnp.pad(mask.T, ((0, 0), (0, padded - cols)))

  def block_step(w, i1):
    w1 = jax.lax.dynamic_slice(w, (0, i1), (rows, block))
    u1 = jax.lax.dynamic_slice(upper, (i1, i1), (block, block))
    if fixed is not None:
      mask1 = jax.lax.dynamic_slice(fixed, (0, i1), (rows, block))
    elif spec.semi_structured:
      mask1 = jnp.zeros((rows, block), bool)
    else:  # adaptive selection (3.2): the smallest OBS errors w^2 / [H_F^-1]_ii = w^2 / U_ii^2
      real = i1 + jnp.arange(block) < cols
      saliency = jnp.where(real[None], w1 ** 2 / jnp.diagonal(u1)[None] ** 2, jnp.inf)
      mask1 = smallest(saliency, jnp.round(sparsity * rows * jnp.sum(real)))
    q1, err1, mask1 = _prune_block(w1, u1, mask1, spec, quantize,
                                   select_groups=spec.semi_structured and fixed is None)
    # The lazy update of every later column at once (U is zero left of the block); the
    # block's own columns are then replaced by their final values.
    w = w - err1 @ jax.lax.dynamic_slice(upper, (i1, 0), (block, padded))
    return jax.lax.dynamic_update_slice(w, q1, (0, i1)), mask1

  w, masks = jax.lax.scan(block_step, w, jnp.arange(0, padded, block))
  pruned = w[:, :cols].T
  pruned = jnp.where(int8, to_int8_grid(pruned), pruned)
  return pruned, masks.transpose(1, 0, 2).reshape(rows, padded)[:, :cols].T
