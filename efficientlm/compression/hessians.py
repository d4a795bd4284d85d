"""The Hessians of the layer-wise pruning problems: H = 2 X X^T / n for the inputs X of every
linear layer of one transformer layer, captured from the model's own forward pass.

SparseGPT (Frantar & Alistarh 2023, section 3) prunes each linear layer to minimise
||W X - W' X||^2 over calibration inputs X [in, n tokens]; the problem's Hessian is H = 2 X X^T
(the authors average it over samples: 2/n sum_t x_t x_t^T, which only rescales it). Here a
jitted forward pass with flax's method interception records, for every DenseGeneral under one
transformer layer (keyed by its parameter path, `decoder/layers_3/mlp/wo/kernel`), the float32
sum of x_t x_t^T over the real tokens and their count; the caller adds them up over the
calibration batches and divides (`hessian`). The rest of the network after that layer is dead
code to XLA and is not computed.

Tokens: padding positions (target or encoder token 0) are left out, via the batch's masks, for
every layer whose leading input dims are [batch, length] (all of attention and MLP). Experts of
MoE layers (layers/moe/layer.py `Experts`, stacked kernels [E, in, out]) get one Hessian per
expert from the inputs actually dispatched to it (its capacity slots, or its rows of the
dropless sort; empty slots are zero and do not count); there padding tokens routed to an expert
do count (deviation: the routing hides which slot holds which position). The MoE router is
never captured (it is never pruned).

The reconstruction error of a pruned kernel follows from the (undamped) Hessian alone:
||(W - W') X||^2 / ||W X||^2 = tr(D^T H D) / tr(K^T H K) with D = K - K' ([in, out] kernels).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efficientlm.errors import ConfigError
from efficientlm.layers.dense import DenseGeneral
from efficientlm.layers.moe.layer import Experts

Sums = dict[str, tuple[jax.Array, jax.Array]]  # kernel name -> (sum of x x^T, token count)


def kernel_kind(name: str) -> str:
  """'experts', 'mlp', 'logits' or 'attention' (every other linear layer of a token mixer)."""
  if '/expert/' in name:
    return 'experts'
  if '/mlp/' in name:
    return 'mlp'
  if 'logits_dense' in name:
    return 'logits'
  return 'attention'


def token_masks(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Real (non-padding) positions of each stack: [batch, length] float32."""
  masks = {}
  decoder = batch.get('decoder_target_tokens', batch.get('decoder_input_tokens'))
  if decoder is not None:
    masks['decoder'] = (decoder > 0).astype(jnp.float32)
  if 'encoder_input_tokens' in batch:
    masks['encoder'] = (batch['encoder_input_tokens'] > 0).astype(jnp.float32)
  return masks


def stack_of(path: str) -> str:
  """Which stack's positions a linear layer's inputs are (cross-attention K/V: the encoder's)."""
  if path.startswith('encoder/'):
    return 'encoder'
  if '/encoder_decoder_attention/' in path and path.rsplit('/', 1)[-1] in ('key', 'value'):
    return 'encoder'
  return 'decoder'


def _add(sums: Sums, name: str, hessian: jax.Array, count: jax.Array) -> None:
  if name in sums:
    hessian, count = hessian + sums[name][0], count + sums[name][1]
  sums[name] = (hessian, count)


def _gram(x: jax.Array, weights: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  x = x.astype(jnp.float32)
  if weights is None:
    return x.T @ x, jnp.float32(x.shape[0])
  return (x * weights[:, None]).T @ x, jnp.sum(weights)


def _expert_grams(x: jax.Array, expert_ids: jax.Array | None, num_experts: int):
  """Per-expert sums of x x^T and token counts: x [E, slots, d] (dispatched slots, empty ones
  zero), or x [N, d] with each row's expert id."""
  x = x.astype(jnp.float32)
  if expert_ids is None:
    real = jnp.any(x != 0, axis=-1).astype(jnp.float32)
    return jnp.einsum('etd,etf->edf', x, x), jnp.sum(real, axis=-1)
  # One expert at a time: memory stays O(N d) (a one-hot einsum would hold [N, E, d]), at E
  # times the FLOPs of the ragged sum, which is only a calibration pass.
  def one(e):
    mine = (expert_ids == e).astype(jnp.float32)
    return (x * mine[:, None]).T @ x, jnp.sum(mine)

  return jax.lax.map(one, jnp.arange(num_experts))


def recorder(unit: str, masks: Mapping[str, jax.Array], sums: Sums):
  """A flax method interceptor that adds the inputs of the linear layers under the module path
  `unit` ('' for all) to `sums`."""
  expert_ids: dict[str, jax.Array | None] = {}

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    path = '/'.join(module.path)
    inside = not unit or path == unit or path.startswith(unit + '/')
    if not inside or 'router' in module.path:
      return next_fun(*args, **kwargs)
    if isinstance(module, DenseGeneral) and context.method_name == '__call__':
      x = args[0] if args else kwargs['inputs']
      axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
      lead = x.shape[:x.ndim - len(axes)]
      mask = masks.get(stack_of(path))
      weights = mask.reshape(-1) if mask is not None and mask.shape == lead else None
      _add(sums, f'{path}/kernel', *_gram(x.reshape(math.prod(lead), -1), weights))
    elif isinstance(module, Experts) and context.method_name == '__call__':
      x = args[0] if args else kwargs['x']
      sizes = args[2] if len(args) > 2 else kwargs.get('group_sizes')
      if sizes is None:
        ids = None
        x = x.reshape(x.shape[0], -1, x.shape[-1])
      else:  # rows sorted by expert: row r belongs to the first expert whose end exceeds r
        ids = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(x.shape[0]), side='right')
      expert_ids[path] = ids
      names = ['wi'] if len(module.activations) == 1 else [
          f'wi_{i}' for i in range(len(module.activations))]
      grams = _expert_grams(x, ids, module.num_experts)
      for name in names:
        _add(sums, f'{path}/{name}/kernel', *grams)
    elif isinstance(module, Experts) and context.method_name == '_hidden':
      hidden = next_fun(*args, **kwargs)  # wo's input
      _add(sums, f'{path}/wo/kernel', *_expert_grams(hidden, expert_ids[path],
                                                      module.num_experts))
      return hidden
    return next_fun(*args, **kwargs)

  return intercept


@functools.partial(jax.jit, static_argnames=('model', 'unit'))
def capture(model, unit: str, params, batch) -> Sums:
  """{kernel name: (sum of x x^T float32, token count)} over one batch, for every linear layer
  under the parameter path `unit` (e.g. 'decoder/layers_2'); `model` must run unscanned and
  without remat (prune.py builds it so), since values recorded inside a JAX transform cannot
  leave it."""
  sums: Sums = {}
  with nn.intercept_methods(recorder(unit, token_masks(batch), sums)):
    model.logits(params, batch)  # unused: only what the recorded inputs need is computed
  return sums


@jax.jit
def hessian(total: tuple[jax.Array, jax.Array]) -> jax.Array:
  """H = 2/n sum x x^T from accumulated (sum, count) ([..., in, in] and [...])."""
  gram, count = total
  return 2.0 * gram / jnp.maximum(count, 1.0)[..., None, None]


def relative_error(hessian_: jax.Array, kernel: jax.Array, pruned: jax.Array) -> jax.Array:
  """||(W - W') X||^2 / ||W X||^2 from H, for kernels [..., in, out] (summed over experts)."""
  kernel = kernel.astype(jnp.float32)
  delta = kernel - pruned.astype(jnp.float32)
  num = jnp.einsum('...io,...ij,...jo->', delta, hessian_, delta)
  den = jnp.einsum('...io,...ij,...jo->', kernel, hessian_, kernel)
  return num / jnp.maximum(den, 1e-30)


def check_tokens(name: str, count, in_features: int, sequences: int) -> None:
  """Refuses a Hessian from fewer tokens than inputs (rank-deficient: the dampening alone would
  decide the solution); says how many more calibration sequences would do, at the rate at which
  this layer (or its worst-fed expert) received tokens."""
  counts = np.atleast_1d(np.asarray(count))
  low = int(np.argmin(counts))
  seen = int(counts[low])
  if seen >= in_features:
    return
  expert = counts.size > 1
  where = f'expert {low} of {name}' if expert else name
  missing = in_features - seen
  if seen:
    rate = seen / sequences
    more = (f'raise CALIBRATION_SEQUENCES by about {math.ceil(missing / rate)} (it received '
            f'{rate:.3g} tokens per sequence)')
  else:
    more = 'it received none: raise CALIBRATION_SEQUENCES'
  raise ConfigError(
      f'Calibration data gave {where} only {seen} tokens for its {in_features} inputs: its '
      'Hessian X X^T is rank-deficient (ill-conditioned), so the pruning would be decided by the '
      f'dampening, not the data. It needs at least {missing} more tokens: {more}'
      + (', or leave the experts out (PRUNE_LAYER_KINDS)' if expert else '') + '.')
