"""Router losses and statistics sown by the MoE layers ('moe' collection), averaged over layers.

Each MoE layer sows load_balancing_loss, router_z_loss, fraction_dropped (scalars) and
expert_load ([E]); a scanned stack stacks them over its blocks. The model's loss adds
aux_weight * mean(load balancing) + z_weight * mean(router z-loss), averaged over MoE layers as
T5X does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

SCALARS = ('load_balancing_loss', 'router_z_loss', 'fraction_dropped')


def _leaves(state: Mapping, name: str) -> list[jax.Array]:
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    keys = [str(getattr(k, 'key', '')) for k in path]
    if name in keys:
      found.append(leaf)
  return found


def summarize(state: Mapping) -> dict[str, jax.Array]:
  """Means over MoE layers; empty when the model has none. expert_load: min, max and entropy
  (in nats; log E when perfectly balanced) of the mean load."""
  out = {}
  for name in SCALARS:
    values = [v.reshape(-1) for v in _leaves(state, name)]
    if values:
      out[name] = jnp.mean(jnp.concatenate(values)).astype(jnp.float32)
  loads = [v.reshape(-1, v.shape[-1]) for v in _leaves(state, 'expert_load')]
  if loads:
    load = jnp.mean(jnp.concatenate(loads), axis=0)
    out['expert_load_min'] = jnp.min(load)
    out['expert_load_max'] = jnp.max(load)
    p = load / jnp.maximum(jnp.sum(load), 1e-9)
    out['expert_load_entropy'] = -jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0))
    out['expert_load_entropy_max'] = jnp.asarray(math.log(load.shape[0]), jnp.float32)
  return out
