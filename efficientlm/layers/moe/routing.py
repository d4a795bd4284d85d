"""MoE routers as small pure functions: probabilities, auxiliary losses, capacity, assignments.

Shapes: G groups of T tokens, E experts, C expert capacity (slots per expert and group), k experts
per token. Router math runs in float32 whatever the activation dtype: Switch found bfloat16
routers unstable. The dropping path consumes `Routing` (one-hot dispatch and combine tensors);
the dropless path consumes the capacity-free `Assignment`.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Assignment:
  """Tokens-choose top-k before capacity: each token's k experts, best first."""

  expert_index: jax.Array  # [G, T, k] int32
  gates: jax.Array  # [G, T, k] float32, renormalized over k if asked


@flax.struct.dataclass
class Routing:
  """What the dropping path needs: dispatch [G, T, E, C] bool, combine [G, T, E, C] float32."""

  dispatch_mask: jax.Array
  combine_weights: jax.Array
  # float32 'load_balancing_loss', 'router_z_loss', 'fraction_dropped' scalars; 'expert_load' [E].
  aux: dict[str, jax.Array]


def _check_router_shape(x: jax.Array, name: str = 'logits') -> None:
  if x.ndim != 3:
    raise ValueError(f'Router {name} must be [groups, tokens, experts], got shape {x.shape}.')


def _check_capacity(capacity: int) -> None:
  if capacity < 1:
    raise ValueError(f'Expert capacity must be at least 1, got {capacity}.')


def router_probabilities(logits: jax.Array) -> jax.Array:
  """Softmax over experts in float32: [G, T, E] -> [G, T, E]."""
  _check_router_shape(logits)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE z-loss: mean over all tokens of logsumexp_e(logits)^2, a float32 scalar."""
  _check_router_shape(logits)
  log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(log_z))


def load_balancing_loss(probs: jax.Array, expert_index: jax.Array) -> jax.Array:
  """Switch/T5X auxiliary loss E^2 * mean_{g,e}(f[g, e] * P[g, e]).

  f[g, e] is the fraction of group g's tokens that chose e among their k choices (before capacity
  drops), P[g, e] the mean probability of e in group g. Balanced top-1 routing with uniform
  probabilities gives 1; with k > 1 the T5X convention gives k.
  """
  _check_router_shape(probs, 'probs')
  if expert_index.ndim != 3 or expert_index.shape[:2] != probs.shape[:2]:
    raise ValueError(f'expert_index must be [groups, tokens, k] matching probs {probs.shape}, '
                     f'got shape {expert_index.shape}.')
  num_experts = probs.shape[-1]
  # A token counts once for each of its (distinct) chosen experts.
  chose = jnp.max(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=-2)
  fraction = jnp.mean(chose, axis=1)
  mean_prob = jnp.mean(probs.astype(jnp.float32), axis=1)
  return jnp.mean(fraction * mean_prob) * float(num_experts**2)


def expert_capacity(tokens_per_group: int,
                    num_experts: int,
                    capacity_factor: float,
                    min_capacity: int = 4,
                    num_selected: int = 1) -> int:
  """Slots per expert and group: round(factor * T * k / E), at least min_capacity, at most T * k.

  Rounding is Python's round (half to even, as T5X's int(round(...))): 2.5 -> 2, 3.5 -> 4.
  """
  if capacity_factor <= 0:
    raise ValueError(f'capacity_factor must be > 0, got {capacity_factor}.')
  for name, value in (('num_experts', num_experts), ('tokens_per_group', tokens_per_group),
                      ('min_capacity', min_capacity), ('num_selected', num_selected)):
    if value < 1:
      raise ValueError(f'{name} must be at least 1, got {value}.')
  if num_selected > num_experts:
    raise ValueError(f'num_selected={num_selected} experts per token exceeds num_experts='
                     f'{num_experts}.')
  capacity = max(round(capacity_factor * tokens_per_group * num_selected / num_experts),
                 min_capacity)
  # More slots than the group has token choices could never be filled.
  return min(capacity, tokens_per_group * num_selected)


def top_k_assignment(probs: jax.Array, k: int, renormalize: bool = False) -> Assignment:
  """Each token's k most probable experts (lower expert index first on ties) and their gates."""
  _check_router_shape(probs, 'probs')
  num_experts = probs.shape[-1]
  if not 1 <= k <= num_experts:
    raise ValueError(f'k={k} experts per token must be between 1 and num_experts={num_experts}.')
  gates, expert_index = jax.lax.top_k(probs.astype(jnp.float32), k)
  if renormalize:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return Assignment(expert_index=expert_index.astype(jnp.int32), gates=gates)


def _buffer_slots(expert_index: jax.Array, num_experts: int) -> jax.Array:
  """Buffer slot of every choice: [G, T, k] expert ids -> [G, T, k] int32 slot indices.

  Buffers fill rank-major (GShard): every token's first choice in token order, then every second
  choice, and so on, so a second choice never displaces anyone's first.
  """
  groups, tokens, k = expert_index.shape
  by_rank = jnp.swapaxes(expert_index, 1, 2).reshape(groups, k * tokens)
  hot = jax.nn.one_hot(by_rank, num_experts, dtype=jnp.int32)
  # The slot a choice takes is the number of earlier choices of the same expert.
  earlier = jnp.cumsum(hot, axis=1) - hot
  slots = jnp.sum(earlier * hot, axis=-1)
  return jnp.swapaxes(slots.reshape(groups, k, tokens), 1, 2)


def _take_tokens(x: jax.Array, order: jax.Array) -> jax.Array:
  """Reorders the token axis of [G, T, ...] by order [G, T]."""
  return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)


def _expert_load(dispatch_mask: jax.Array) -> jax.Array:
  """[E] fraction of all dispatched slots that went to each expert (zeros if none were)."""
  per_expert = jnp.sum(dispatch_mask, axis=(0, 1, 3), dtype=jnp.float32)
  return per_expert / jnp.maximum(jnp.sum(per_expert), 1.0)


def tokens_choose(logits: jax.Array,
                  capacity: int,
                  k: int = 1,
                  renormalize: bool = False,
                  batch_prioritized: bool = False) -> Routing:
  """GShard/T5X token-choice top-k routing with `capacity` slots per expert and group.

  Choices fill slots rank-major (all first choices, then all second ...); within a rank, in token
  order, or with `batch_prioritized` (V-MoE's BPR) by decreasing top-1 probability, ties by
  position. Choices past the capacity are dropped. Gates are renormalized before dropping (T5X).
  """
  _check_router_shape(logits)
  _check_capacity(capacity)
  probs = router_probabilities(logits)
  num_experts = probs.shape[-1]
  assignment = top_k_assignment(probs, k, renormalize)
  expert_index = assignment.expert_index
  if batch_prioritized:
    # A stable sort on the negated probability keeps position order among ties.
    order = jnp.argsort(-jnp.max(probs, axis=-1), axis=-1, stable=True)
    slots = _buffer_slots(_take_tokens(expert_index, order), num_experts)
    slots = _take_tokens(slots, jnp.argsort(order, axis=-1))
  else:
    slots = _buffer_slots(expert_index, num_experts)

  # [G, T, k, E, C]: choice j of token t sits in slot c of expert e. Slots >= C match no c.
  per_choice = ((expert_index[..., None, None] == jnp.arange(num_experts)[:, None]) &
                (slots[..., None, None] == jnp.arange(capacity)))
  dispatch_mask = jnp.any(per_choice, axis=2)
  combine_weights = jnp.einsum('gtk,gtkec->gtec', assignment.gates,
                               per_choice.astype(jnp.float32))
  aux = {
      'load_balancing_loss': load_balancing_loss(probs, expert_index),
      'router_z_loss': router_z_loss(logits),
      'fraction_dropped': jnp.mean((slots >= capacity).astype(jnp.float32)),
      'expert_load': _expert_load(dispatch_mask),
  }
  return Routing(dispatch_mask=dispatch_mask, combine_weights=combine_weights, aux=aux)


def experts_choose(logits: jax.Array, capacity: int) -> Routing:
  """Expert-choice routing (Zhou et al. 2022): expert e takes its `capacity` most probable tokens.

  Slot c of expert e holds its c-th pick, by decreasing probability, ties by position. A token
  may go to several experts or to none. Looks at the whole group, so not causal. A capacity
  above the group size leaves the extra slots empty.
  """
  _check_router_shape(logits)
  _check_capacity(capacity)
  probs = router_probabilities(logits)
  tokens = probs.shape[1]
  picks = min(capacity, tokens)
  # lax.top_k puts the lower index first among equal values: ties go by position.
  _, token_index = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), picks)  # [G, E, picks]
  dispatch_mask = token_index[:, None] == jnp.arange(tokens)[:, None, None]  # [G, T, E, picks]
  dispatch_mask = jnp.pad(dispatch_mask, ((0, 0), (0, 0), (0, 0), (0, capacity - picks)))
  combine_weights = jnp.where(dispatch_mask, probs[..., None], 0.0)
  taken = jnp.any(dispatch_mask, axis=(2, 3))
  aux = {
      # Every expert takes the same number of tokens: nothing to balance.
      'load_balancing_loss': jnp.zeros((), jnp.float32),
      'router_z_loss': router_z_loss(logits),
      'fraction_dropped': 1.0 - jnp.mean(taken.astype(jnp.float32)),
      'expert_load': _expert_load(dispatch_mask),
  }
  return Routing(dispatch_mask=dispatch_mask, combine_weights=combine_weights, aux=aux)


def jitter(x: jax.Array, rng: jax.Array, eps: float) -> jax.Array:
  """Switch's multiplicative jitter on the router input: x * Uniform(1 - eps, 1 + eps).

  The noise is float32; the result keeps x's dtype. eps == 0 returns x unchanged.
  """
  if not 0.0 <= eps < 1.0:
    raise ValueError(f'Jitter eps must be in [0, 1), got {eps}.')
  if eps == 0.0:
    return x
  noise = jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
  return (x.astype(jnp.float32) * noise).astype(x.dtype)
