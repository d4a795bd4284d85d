"""MoE routers on hand-built cases: explicit probabilities, slots, drops and losses by hand.

Logits are log(p) of hand-picked probabilities p, so softmax recovers p and every expected mask,
weight and loss below follows from those numbers with pen and paper.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.layers.moe import routing



# The routers run jitted (one program each, cached across tests by shape and static arguments),
# not op by op; test_everything_jits and the error tests call them eagerly.
_tokens_choose = jax.jit(routing.tokens_choose,
                         static_argnames=('capacity', 'k', 'renormalize', 'batch_prioritized'))
_experts_choose = jax.jit(routing.experts_choose, static_argnames='capacity')
_top_k_assignment = jax.jit(routing.top_k_assignment, static_argnames=('k', 'renormalize'))
_router_probabilities = jax.jit(routing.router_probabilities)
_router_z_loss = jax.jit(routing.router_z_loss)
_load_balancing_loss = jax.jit(routing.load_balancing_loss)
_jitter = jax.jit(routing.jitter, static_argnames='eps')


def _logits(probs):
  """[G, T, E] log-probabilities (rows of probs sum to 1), so softmax(logits) == probs."""
  return jnp.log(jnp.asarray(probs, jnp.float32))


def _mask(shape, placements):
  """[G, T, E, C] bool with True at each (g, t, e, c) in placements."""
  mask = np.zeros(shape, bool)
  for place in placements:
    mask[place] = True
  return mask


# One group, 5 tokens, 3 experts; top-1 choices e0, e1, e0, e0, e2.
TOP1_PROBS = [[0.6, 0.3, 0.1],
              [0.2, 0.7, 0.1],
              [0.5, 0.2, 0.3],
              [0.8, 0.1, 0.1],
              [0.1, 0.2, 0.7]]


def test_top1_fills_slots_in_position_order_and_drops_the_late_token():
  # Group 1 holds the same tokens in reverse order; capacity 2 is per group.
  probs = np.array([TOP1_PROBS, TOP1_PROBS[::-1]])
  got = _tokens_choose(_logits(probs), capacity=2)
  expected = _mask((2, 5, 3, 2), [
      (0, 0, 0, 0), (0, 1, 1, 0), (0, 2, 0, 1), (0, 4, 2, 0),  # token 3 (e0, third) dropped
      (1, 0, 2, 0), (1, 1, 0, 0), (1, 2, 0, 1), (1, 3, 1, 0),  # token 4 (e0, third) dropped
  ])
  np.testing.assert_array_equal(got.dispatch_mask, expected)
  np.testing.assert_allclose(got.combine_weights, np.where(expected, probs[..., None], 0.0),
                             rtol=1e-6)
  np.testing.assert_allclose(got.aux['fraction_dropped'], 0.2, rtol=1e-6)
  np.testing.assert_allclose(got.aux['expert_load'], [0.5, 0.25, 0.25], rtol=1e-6)


def test_top1_combine_weights_are_the_softmax_of_the_logits():
  logits = jnp.array([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]])
  got = _tokens_choose(logits, capacity=4)
  first = [math.exp(x) / (math.exp(1.0) + math.exp(2.0) + math.exp(0.5)) for x in (1.0, 2.0, 0.5)]
  second = [math.exp(x) / (1.0 + math.exp(-1.0) + math.exp(3.0)) for x in (0.0, -1.0, 3.0)]
  np.testing.assert_allclose(_router_probabilities(logits), [[first, second]], rtol=1e-6)
  expected = np.zeros((1, 2, 3, 4))
  expected[0, 0, 1, 0], expected[0, 1, 2, 0] = first[1], second[2]
  np.testing.assert_allclose(got.combine_weights, expected, rtol=1e-6)
  np.testing.assert_array_equal(got.dispatch_mask, expected > 0)


def test_batch_prioritized_drops_the_least_confident_tokens():
  probs = np.array([TOP1_PROBS])
  got = _tokens_choose(_logits(probs), capacity=2, batch_prioritized=True)
  # Expert 0's tokens by top-1 probability: t3 (0.8), t0 (0.6), then t2 (0.5) is dropped.
  expected = _mask((1, 5, 3, 2), [(0, 3, 0, 0), (0, 0, 0, 1), (0, 1, 1, 0), (0, 4, 2, 0)])
  np.testing.assert_array_equal(got.dispatch_mask, expected)
  np.testing.assert_allclose(got.combine_weights, np.where(expected, probs[..., None], 0.0),
                             rtol=1e-6)


def test_batch_prioritized_breaks_ties_by_position():
  # t1 and t2 tie at 0.7 for expert 0; t3 (0.9) goes first, then t1 takes the last slot.
  probs = np.array([[[0.4, 0.6], [0.7, 0.3], [0.7, 0.3], [0.9, 0.1]]])
  prioritized = _tokens_choose(_logits(probs), capacity=2, batch_prioritized=True)
  np.testing.assert_array_equal(prioritized.dispatch_mask, _mask(
      (1, 4, 2, 2), [(0, 0, 1, 0), (0, 3, 0, 0), (0, 1, 0, 1)]))
  # In position order the late, most confident t3 is the one dropped.
  in_order = _tokens_choose(_logits(probs), capacity=2)
  np.testing.assert_array_equal(in_order.dispatch_mask, _mask(
      (1, 4, 2, 2), [(0, 0, 1, 0), (0, 1, 0, 0), (0, 2, 0, 1)]))


# Top-2: first choices e0, e1, e1, e2; second choices e1, e0, e0, e1.
TOP2_PROBS = [[0.5, 0.3, 0.2],
              [0.3, 0.6, 0.1],
              [0.2, 0.7, 0.1],
              [0.1, 0.3, 0.6]]
# With capacity 2, t2's first choice takes e1's last slot ahead of t0's second choice; e0's second
# slot goes to t1's second choice; t0's, t2's and t3's second choices are dropped.
TOP2_KEPT = [(0, 0, 0, 0), (0, 1, 1, 0), (0, 2, 1, 1), (0, 3, 2, 0), (0, 1, 0, 1)]


@pytest.mark.parametrize('renormalize', [False, True])
def test_top2_second_choices_wait_for_all_first_choices(renormalize):
  probs = np.array([TOP2_PROBS])
  got = _tokens_choose(_logits(probs), capacity=2, k=2, renormalize=renormalize)
  expected = _mask((1, 4, 3, 2), TOP2_KEPT)
  np.testing.assert_array_equal(got.dispatch_mask, expected)
  # Renormalized gates divide by the token's top-2 sum (before any drop): 0.8, 0.9, 0.9, 0.9.
  top2_sum = np.array([0.8, 0.9, 0.9, 0.9])[None, :, None, None] if renormalize else 1.0
  np.testing.assert_allclose(got.combine_weights,
                             np.where(expected, probs[..., None] / top2_sum, 0.0), rtol=1e-6)
  np.testing.assert_allclose(got.aux['fraction_dropped'], 3 / 8, rtol=1e-6)
  np.testing.assert_allclose(got.aux['expert_load'], [0.4, 0.4, 0.2], rtol=1e-6)
  if renormalize:  # t1 kept both choices: its weights sum to 1.
    np.testing.assert_allclose(got.combine_weights[0, 1].sum(), 1.0, rtol=1e-6)


def test_top_k_assignment_gates_best_first_and_renormalized():
  probs = jnp.array([TOP2_PROBS])
  plain = _top_k_assignment(probs, k=2)
  np.testing.assert_array_equal(plain.expert_index, [[[0, 1], [1, 0], [1, 0], [2, 1]]])
  assert plain.expert_index.dtype == jnp.int32
  np.testing.assert_allclose(plain.gates, [[[0.5, 0.3], [0.6, 0.3], [0.7, 0.2], [0.6, 0.3]]],
                             rtol=1e-6)
  renormalized = _top_k_assignment(probs, k=2, renormalize=True)
  np.testing.assert_allclose(renormalized.gates,
                             [[[5 / 8, 3 / 8], [2 / 3, 1 / 3], [7 / 9, 2 / 9], [2 / 3, 1 / 3]]],
                             rtol=1e-6)
  for k in (0, 4):
    with pytest.raises(ValueError, match='between 1 and num_experts=3'):
      _top_k_assignment(probs, k=k)


def test_experts_choose_takes_each_experts_most_probable_tokens():
  # Expert 0 ranks t0 (0.6), then t2 and t3 tie at 0.5: t2 by position. Expert 1 ranks t1 (0.8),
  # then t2 over t3 again. t2 goes to both experts, t3 to none.
  probs = np.array([[[0.6, 0.4], [0.2, 0.8], [0.5, 0.5], [0.5, 0.5]]])
  got = _experts_choose(_logits(probs), capacity=2)
  expected = _mask((1, 4, 2, 2), [(0, 0, 0, 0), (0, 2, 0, 1), (0, 1, 1, 0), (0, 2, 1, 1)])
  np.testing.assert_array_equal(got.dispatch_mask, expected)
  np.testing.assert_allclose(got.combine_weights, np.where(expected, probs[..., None], 0.0),
                             rtol=1e-6)
  np.testing.assert_allclose(got.aux['fraction_dropped'], 0.25, rtol=1e-6)
  np.testing.assert_allclose(got.aux['expert_load'], [0.5, 0.5], rtol=1e-6)
  assert float(got.aux['load_balancing_loss']) == 0.0


def test_experts_choose_capacity_above_group_size_leaves_slots_empty():
  probs = np.array([[[0.3, 0.7], [0.9, 0.1]]])
  got = _experts_choose(_logits(probs), capacity=3)
  np.testing.assert_array_equal(got.dispatch_mask, _mask(
      (1, 2, 2, 3), [(0, 1, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 1, 1)]))
  assert float(got.aux['fraction_dropped']) == 0.0


def test_load_balancing_loss_closed_forms():
  num_experts = 4
  uniform = jnp.full((2, 8, num_experts), 1 / num_experts)
  balanced = jnp.tile(jnp.arange(num_experts), (2, 2))[..., None]  # each expert 2 tokens/group
  np.testing.assert_allclose(_load_balancing_loss(uniform, balanced), 1.0, rtol=1e-6)
  collapsed = jnp.zeros((2, 8, num_experts)).at[..., 1].set(1.0)
  to_one = jnp.ones((2, 8, 1), jnp.int32)
  np.testing.assert_allclose(_load_balancing_loss(collapsed, to_one), num_experts,
                             rtol=1e-6)


def test_load_balancing_loss_by_hand_counts_choices_before_drops():
  # f = [3, 1, 1] / 5 (t3 is dropped at capacity 2 but still counts), P = [2.2, 1.5, 1.3] / 5.
  by_hand = 3**2 * (0.6 * 0.44 + 0.2 * 0.3 + 0.2 * 0.26) / 3
  probs = jnp.array([TOP1_PROBS])
  index = jnp.array([[[0], [1], [0], [0], [2]]])
  np.testing.assert_allclose(_load_balancing_loss(probs, index), by_hand, rtol=1e-6)
  got = _tokens_choose(_logits(probs), capacity=2)
  np.testing.assert_allclose(got.aux['load_balancing_loss'], by_hand, rtol=1e-5)


def test_router_z_loss_is_mean_squared_log_sum_exp():
  groups = [[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], [[-2.0, 0.5, 4.0], [3.0, 3.0, -1.0]]]
  by_hand = np.mean([math.log(sum(math.exp(x) for x in row))**2
                     for rows in groups for row in rows])
  logits = jnp.array(groups)
  np.testing.assert_allclose(_router_z_loss(logits), by_hand, rtol=1e-6)
  for route in (_tokens_choose(logits, 2), _experts_choose(logits, 2)):
    np.testing.assert_allclose(route.aux['router_z_loss'], by_hand, rtol=1e-6)


@pytest.mark.parametrize('args, expected', [
    ((64, 8, 1.25), 10),  # round(1.25 * 64 / 8)
    ((64, 8, 1.0), 8),
    ((16, 8, 1.0), 4),  # 2, raised to min_capacity
    ((16, 8, 1.0, 1), 2),  # a lower floor keeps it
    ((64, 8, 1.25, 4, 2), 20),  # k = 2: T * k token choices
    ((10, 4, 1.0, 1), 2),  # round(2.5) is 2: half to even
    ((14, 4, 1.0, 1), 4),  # round(3.5) is 4
    ((4, 2, 4.0), 4),  # 8 would exceed the group's 4 tokens
    ((2, 8, 1.0), 2),  # min_capacity 4 would exceed them too
])
def test_expert_capacity_by_hand(args, expected):
  assert routing.expert_capacity(*args) == expected


@pytest.mark.parametrize('kwargs, message', [
    (dict(capacity_factor=0.0), 'capacity_factor must be > 0'),
    (dict(capacity_factor=-1.0), 'capacity_factor must be > 0'),
    (dict(num_experts=0), 'num_experts must be at least 1'),
    (dict(tokens_per_group=0), 'tokens_per_group must be at least 1'),
    (dict(min_capacity=0), 'min_capacity must be at least 1'),
    (dict(num_selected=0), 'num_selected must be at least 1'),
    (dict(num_selected=9), 'exceeds num_experts=8'),
])
def test_expert_capacity_rejects_bad_arguments(kwargs, message):
  args = dict(tokens_per_group=64, num_experts=8, capacity_factor=1.25) | kwargs
  with pytest.raises(ValueError, match=message):
    routing.expert_capacity(**args)


def test_shape_errors():
  with pytest.raises(ValueError, match=r'\[groups, tokens, experts\], got shape \(4, 3\)'):
    routing.tokens_choose(jnp.zeros((4, 3)), capacity=2)
  with pytest.raises(ValueError, match='must be at least 1, got 0'):
    routing.tokens_choose(jnp.zeros((1, 4, 3)), capacity=0)
  with pytest.raises(ValueError, match='must be at least 1, got 0'):
    routing.experts_choose(jnp.zeros((1, 4, 3)), capacity=0)
  with pytest.raises(ValueError, match='expert_index must be'):
    routing.load_balancing_loss(jnp.zeros((1, 4, 3)), jnp.zeros((1, 5, 1), jnp.int32))


def test_jitter_bounds_spread_and_determinism():
  x = jnp.linspace(-3.0, 3.0, 10_000).astype(jnp.float32)
  eps = 0.1
  y = _jitter(x, jax.random.key(0), eps)
  assert routing.jitter(x, jax.random.key(0), 0.0) is x  # eager: jit would return a copy
  np.testing.assert_array_equal(y, _jitter(x, jax.random.key(0), eps))
  assert not np.array_equal(y, _jitter(x, jax.random.key(1), eps))
  ratio = np.asarray(y / x)
  # Multiplicative Uniform(1 - eps, 1 + eps): within the bounds, reaching near both, mean 1.
  assert ratio.min() >= 1 - eps - 1e-6 and ratio.max() <= 1 + eps + 1e-6
  assert ratio.min() < 1 - 0.9 * eps and ratio.max() > 1 + 0.9 * eps
  assert abs(ratio.mean() - 1.0) < 5e-3
  bf16 = _jitter(x.astype(jnp.bfloat16), jax.random.key(0), eps)
  assert bf16.dtype == jnp.bfloat16


@pytest.mark.parametrize('eps', [-0.1, 1.0, 1.5])
def test_jitter_rejects_bad_eps(eps):
  with pytest.raises(ValueError, match=r'eps must be in \[0, 1\)'):
    routing.jitter(jnp.ones(3), jax.random.key(0), eps)


def test_router_math_is_float32_for_bfloat16_logits():
  logits32 = jnp.array([[[1.0, 2.0, 0.5, -1.0], [0.25, -3.0, 3.0, 1.5]]])
  logits16 = logits32.astype(jnp.bfloat16)  # these values are exact in bfloat16
  probs = _router_probabilities(logits16)
  assert probs.dtype == jnp.float32
  np.testing.assert_allclose(probs, _router_probabilities(logits32), rtol=1e-7)
  assert _top_k_assignment(probs, 2).gates.dtype == jnp.float32
  for route in (_tokens_choose(logits16, 2, k=2), _experts_choose(logits16, 2)):
    assert route.combine_weights.dtype == jnp.float32 and route.dispatch_mask.dtype == jnp.bool_
    assert all(value.dtype == jnp.float32 for value in route.aux.values())
  np.testing.assert_allclose(_router_z_loss(logits16), _router_z_loss(logits32),
                             rtol=1e-7)


@pytest.mark.parametrize('name, fn', [
    ('tokens_choose', lambda l: routing.tokens_choose(l, 2, k=2, renormalize=True,
                                                      batch_prioritized=True)),
    ('experts_choose', lambda l: routing.experts_choose(l, 2)),
    ('top_k_assignment', lambda l: routing.top_k_assignment(routing.router_probabilities(l), 2)),
    ('router_z_loss', routing.router_z_loss),
    ('load_balancing_loss', lambda l: routing.load_balancing_loss(
        routing.router_probabilities(l), jnp.argmax(l, -1)[..., None])),
    ('jitter', lambda l: routing.jitter(l, jax.random.key(3), 0.2)),
])
def test_everything_jits(name, fn):
  del name
  logits = _logits(np.array([TOP2_PROBS, TOP1_PROBS[:4]]))
  for eager, jitted in zip(jax.tree.leaves(fn(logits)), jax.tree.leaves(jax.jit(fn)(logits))):
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
