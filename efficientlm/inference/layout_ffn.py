"""Feed-forward block of a layout, per chip (inside shard_map): the stages of layout_spec.

`ffn_inputs` (step 1 gathers and step 4 matmuls) returns partial sums ready for the fused
reduce-scatter over Ain, `ffn_hidden` applies the activations and gating (step 5, before the
all-gather over Ain), `ffn_output` is the W_out matmul, partial over Aout (step 6, before the
reduce-scatter). The layer bodies in layouts.py put the collectives between them, so the serial
and the parallel block share this code.
"""

from __future__ import annotations

import jax

from efficientlm.inference.layout_ops import gather_weight, matmul, split_for_scatter
from efficientlm.inference.layout_plan import LayerPlan
from efficientlm.layers.mlp import get_activation


def ffn_inputs(plan: LayerPlan, w: dict, h: jax.Array) -> list[jax.Array]:
  """h [b, L, E/|Ain|] -> G partial sums [b, L, |Ain|, F / (|Aout| |Ain|)]."""
  dtype = plan.config.activation_dtype
  return [split_for_scatter(plan, matmul(h, gather_weight(w[name], plan.ab, axis=1), dtype))
          for name in plan.wi_names]


def ffn_hidden(plan: LayerPlan, outs: list[jax.Array]) -> jax.Array:
  """The G reduce-scattered W_in outputs [b, L, F_(Aout,Ain)] -> act_0(h_0) * act_1(h_1) ..."""
  hidden = None
  for name, h in zip(plan.config.mlp_activations, outs):
    h = get_activation(name)(h)
    hidden = h if hidden is None else hidden * h
  return hidden


def ffn_output(plan: LayerPlan, w: dict, hidden: jax.Array) -> jax.Array:
  """hidden [b, L, F/|Aout|] -> W_out partial over Aout [b, L, E/|Ain|]."""
  return matmul(hidden, gather_weight(w['wo'], plan.ab, axis=0), plan.config.activation_dtype)
