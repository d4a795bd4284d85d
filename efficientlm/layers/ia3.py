"""(IA)3 vectors: learned rescalings of the keys, the values and the feed-forward activations.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", sec. 3.3. With TransformerConfig.ia3 every attention that projects keys and values
(encoder self-, decoder self- and encoder-decoder attention) computes

    softmax(Q (l_k ⊙ K)^T / sqrt(d_k)) (l_v ⊙ V),      l_k, l_v ∈ R^{kv_heads · head_dim}

(one entry per key/value channel: with multi- or grouped-query attention, kv_heads · head_dim),
and every feed-forward layer (l_ff ⊙ γ(W_1 x)) W_2 with l_ff ∈ R^{d_ff}, where for gated MLPs
γ(W_1 x) is the product of the gates (the input of `wo`); each expert of a Mixture-of-Experts
layer has its own l_ff, so the MoE vector is [E, d_ff]. The vectors start at ones, where the model
is its base model exactly (multiplying by 1 is exact in every float format).

Parameters, beside the kernels they scale (T5X-style trees read `.../attention/key/kernel`,
`.../attention/ia3_key_scale`):
    <attention>/ia3_key_scale    [kv_heads * head_dim]   logical axis of the key kernel's output
    <attention>/ia3_value_scale  [kv_heads * head_dim]   ... of the value kernel's output
    mlp/ia3_scale                [mlp_dim]               'mlp' (wo's input axis)
    mlp/expert/ia3_scale         [E, expert mlp_dim]     ('expert', 'expert_mlp')
so they shard like the kernels' matching axes; scanned layers stack them on the 'layers' axis.

Merge (`merge`): (x W_k) ⊙ l_k = x (W_k diag(l_k)), so l_k scales the key kernel's columns, l_v
the value kernel's, and (h ⊙ l_ff) W_2 = h (diag(l_ff) W_2) the rows of `wo`: exact in real
arithmetic; in floating point the merged kernel is rounded once more.

Deviations from the paper and the authors' code (r-three/t-few):
- The vectors are float32 whatever TransformerConfig.param_dtype is: one Adafactor step at the
  recipe's 3e-3 moves a vector entry of 1 by ~3e-3, which rounds back to 1 in bfloat16.
- The authors scale the output of T5.1.1's linear gate `wi_1`; scaling the gates' product is the
  same function (elementwise products commute) and defined for any number of gates.
- Keys are scaled before rotary position embeddings rotate them (T5 has none): that is the
  projection's output, which is what the merge folds into W_k exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

KEY_SCALE = 'ia3_key_scale'
VALUE_SCALE = 'ia3_value_scale'
FF_SCALE = 'ia3_scale'
NAMES = (KEY_SCALE, VALUE_SCALE, FF_SCALE)
# What each vector scales: (the sibling module whose kernel, 'columns' or 'rows').
_TARGETS = {KEY_SCALE: ('key', 'columns'), VALUE_SCALE: ('value', 'columns'),
            FF_SCALE: ('wo', 'rows')}


def scale_vector(module: nn.Module, name: str, shape: Sequence[int],
                 axes: Sequence[str]) -> jax.Array:
  """A float32 (IA)3 vector of `module` (call from its compact method), initialized to ones and
  annotated with the logical `axes` of the kernel dimension it scales."""
  return module.param(name, nn.with_logical_partitioning(nn.initializers.ones, tuple(axes)),
                      tuple(shape), jnp.float32)


def is_vector(name: str) -> bool:
  """Whether the flat parameter name ('decoder/layers_0/mlp/ia3_scale') is an (IA)3 vector."""
  return name.rsplit('/', 1)[-1] in NAMES


def vector_shape(kernel_shape: Sequence[int], side: str) -> tuple[int, ...]:
  """The vector that scales a kernel [..., in, out]: its columns [..., out] or rows [..., in]
  (leading axes: scanned layers, experts)."""
  shape = tuple(kernel_shape)
  return shape[:-2] + shape[-1:] if side == 'columns' else shape[:-1]


def _scaled(kernel: jax.Array, vector: jax.Array, side: str) -> jax.Array:
  factor = vector[..., None, :] if side == 'columns' else vector[..., None]
  return (kernel.astype(jnp.float32) * factor.astype(jnp.float32)).astype(kernel.dtype)


def merge(params: Mapping[str, Any], path: str = '') -> dict[str, Any]:
  """The parameters with every (IA)3 vector folded into the kernel it scales: the tree of the same
  network built with ia3 = False, computing the same function. Pure jnp: jit it with the base
  kernels' shardings as out_shardings."""
  out = {k: (merge(v, f'{path}{k}/') if isinstance(v, Mapping) else v)
         for k, v in params.items() if k not in NAMES}
  for name, (target, side) in _TARGETS.items():
    if name not in params:
      continue
    kernel = params.get(target, {}).get('kernel') if isinstance(params.get(target),
                                                                  Mapping) else None
    if kernel is None:
      raise ValueError(f'{path}{name} scales {path}{target}/kernel, which the parameters lack.')
    if tuple(params[name].shape) != vector_shape(kernel.shape, side):
      raise ValueError(f'{path}{name} has shape {tuple(params[name].shape)}, but '
                       f'{path}{target}/kernel {tuple(kernel.shape)} needs '
                       f'{vector_shape(kernel.shape, side)}.')
    out[target] = dict(out[target], kernel=_scaled(kernel, params[name], side))
  return out


def vector_shapes(params: Mapping[str, Any]) -> dict[str, Any]:
  """The (IA)3 vectors a network with ia3 = True has beside the kernels of `params` (a tree of the
  network without them; arrays or ShapeDtypeStructs), as float32 ShapeDtypeStructs, nested like
  `params`: a key and a value vector where a module has both `key` and `value` kernels, a
  feed-forward vector where it has a `wo` kernel (dense MLPs and MoE experts)."""
  out: dict[str, Any] = {}
  for k, v in params.items():
    if isinstance(v, Mapping):
      sub = vector_shapes(v)
      if sub:
        out[k] = sub

  def kernel(name):
    child = params.get(name)
    return child.get('kernel') if isinstance(child, Mapping) else None

  has = {name: kernel(target) for name, (target, _) in _TARGETS.items()}
  if has[KEY_SCALE] is None or has[VALUE_SCALE] is None:
    has.pop(KEY_SCALE), has.pop(VALUE_SCALE)
  for name, k in has.items():
    if k is not None:
      out[name] = jax.ShapeDtypeStruct(vector_shape(k.shape, _TARGETS[name][1]), jnp.float32)
  return out
