"""BlockRecurrent (layers/block_recurrent.py) against a plain-numpy loop over tokens written from
the paper's equations (Hutchins et al. 2022), and against its own equivalences: one call vs
segments carried in the 'recurrent' collection, prefill + steps vs whole sequences, causality."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.layers import block_recurrent as br
from efficientlm.layers.block_recurrent import BlockRecurrent, BlockRecurrentConfig

W, S, H, D, E = 4, 3, 2, 4, 8  # block, states, heads, head_dim, emb
CFG = BlockRecurrentConfig(block_size=W, num_states=S, state_mlp_dim=12)


def _layer(cfg=CFG, decode=None):
  return BlockRecurrent(cfg, num_heads=H, head_dim=D, decode=decode)


@functools.lru_cache(maxsize=None)
def _cached_init(cfg):
  init = jax.jit(lambda key: _layer(cfg).init(key, jnp.zeros((1, W, E)))['params'])
  return nn.unbox(init(jax.random.key(0)))


def _init(cfg=CFG):
  return jax.tree.map(lambda a: a, _cached_init(cfg))  # a fresh dict tree (tests edit it)


@functools.partial(jax.jit, static_argnames=('cfg', 'decode', 'mutable'))
def _run(variables, x, cfg=CFG, decode=None, mutable=False, mask=None, q_positions=None):
  """One jitted apply (a few compiles instead of eager op-by-op dispatch)."""
  return _layer(cfg, decode).apply(variables, x, mask=mask, q_positions=q_positions,
                                   mutable=mutable)


def _x(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _fresh_collection(batch):
  """A zeroed 'recurrent' collection, as the caller resets it (leaves named by the interface)."""
  return {'started': jnp.zeros((batch,)), 'state': jnp.zeros((batch, S, E)),
          'window_keys': jnp.zeros((batch, W, H, D)), 'window_values': jnp.zeros((batch, W, H, D))}


# --- the reference: one row, token by token, in float64 ------------------------------------------


def np_rotary(x, positions, wavelength=10_000.0):
  """Rotary embedding, half-split pairs (dims i and i + d/2 rotate by position / wl^(2i/d))."""
  half = x.shape[-1] // 2
  angle = positions[:, None, None] * wavelength**(-np.arange(half) / half)
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def np_attend(q, k, v):
  """q [H, d] reads k, v [m, H, d]: softmax over m per head."""
  logits = np.einsum('hd,mhd->hm', q, k)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('hm,mhd->hd', weights, v)


def np_rms(x, scale):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def np_gate(p, prefix, h, c, z, gate):
  sigmoid = lambda a: 1 / (1 + np.exp(-a))
  if gate == 'lstm':
    i = sigmoid(h @ p[prefix + 'input_gate_kernel'] + p[prefix + 'input_gate_bias'] - 1)
    f = sigmoid(h @ p[prefix + 'forget_gate_kernel'] + p[prefix + 'forget_gate_bias'] + 1)
    return c * f + z * i
  g = sigmoid(p[prefix + 'gate_bias'])
  return c * g + z * (1 - g)


def np_state_update(p, c, block_k, block_v, cfg):
  """The horizontal direction for one block: c [S, E], the block's keys/values [W, H, d]."""
  n = np_rms(c, p['attention_norm_scale']) + p['position_embedding']
  heads = lambda name: (n @ p[name]).reshape(len(c), H, D)
  q, q2, k, v = heads('query'), heads('query_to_tokens'), heads('key'), heads('value')
  h = np.stack([np.concatenate([np_attend(q[s], k, v), np_attend(q2[s], block_k, block_v)])
                for s in range(len(c))]).reshape(len(c), -1)
  c = np_gate(p, '', h, c, h @ p['projection'], cfg.gate)
  if cfg.state_mlp:
    u = np.maximum(np_rms(c, p['mlp_norm_scale']) @ p['mlp_wi'], 0)
    c = np_gate(p, 'mlp_', u, c, u @ p['mlp_wo'], cfg.gate)
  return c


def reference(params, x, cfg, c0=None, num_previous=0):
  """Outputs [L - num_previous, E] and final states of one row x [L, E]. The first
  `num_previous` tokens (0 or W) are the previous segment's last block: read through the
  window only; the states start at c0 after them (None: the learned initial state)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  proj = lambda name: (x @ p[name]['kernel']).reshape(len(x), H, D)
  q, k, v = proj('query'), proj('key'), proj('value')
  rot = lambda a, i: np_rotary(a[i][None], np.asarray([float(i)]))[0]
  states = p['states'] if cfg.recurrent else None
  c = None if states is None else (states['initial_state'] if c0 is None else
                                    np.asarray(c0, np.float64))
  outputs = []
  for i in range(num_previous, len(x)):
    first = max(0, (i // cfg.block_size - 1) * cfg.block_size)  # the previous block's start
    keys = np.stack([rot(k, j) for j in range(first, i + 1)])
    heads = [np_attend(rot(q, i), keys, v[first:i + 1])]
    if states is not None:
      n = np_rms(c, states['attention_norm_scale']) + states['position_embedding']
      ck, cv = ((n @ states[name]).reshape(len(c), H, D) for name in ('key', 'value'))
      heads.append(np_attend(proj('query_to_states')[i], ck, cv))
    outputs.append(np.concatenate(heads).reshape(-1) @ p['out']['kernel'])
    if states is not None and (i + 1) % cfg.block_size == 0:
      block = slice(i + 1 - cfg.block_size, i + 1)
      c = np_state_update(states, c, k[block], v[block], cfg)
  return np.stack(outputs), c


# --- tests ----------------------------------------------------------------------------------------


def test_config_and_length_errors_name_the_fix():
  with pytest.raises(ValueError, match='gate'):
    BlockRecurrentConfig(gate='gru')
  with pytest.raises(ValueError, match='block_size'):
    BlockRecurrentConfig(block_size=0)
  params = _init()
  with pytest.raises(ValueError, match='multiple of BlockRecurrentConfig.block_size'):
    _run({'params': params}, _x((1, W + 1, E)))


@pytest.mark.parametrize('zero_cross', [False, True])
def test_without_recurrence_equals_sliding_window_attention(zero_cross):
  """recurrent=False, or a recurrent layer whose token->state half of the output projection is
  zero: plain sliding-window attention (each token reads its block up to itself and the whole
  previous block), written in numpy."""
  cfg = CFG if zero_cross else BlockRecurrentConfig(block_size=W, recurrent=False)
  params = _init(cfg)
  if zero_cross:  # the rows of `out` that read the cross-attention heads
    params['out']['kernel'] = params['out']['kernel'].at[H * D:].set(0)
  x = _x((4, 4 * W, E))
  y = _run({'params': params}, x, cfg)
  window_only = dict(params, out={'kernel': params['out']['kernel'][:H * D]})
  for row in range(4):
    want, _ = reference(window_only, x[row], BlockRecurrentConfig(block_size=W, recurrent=False))
    np.testing.assert_allclose(y[row], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('gate,state_mlp', [('lstm', True), ('fixed', False)])
def test_recurrent_cell_matches_paper_equations(gate, state_mlp):
  """Two blocks continuing from a random state and a previous block (the 'recurrent'
  collection): token outputs and the final states equal the numpy loop."""
  cfg = BlockRecurrentConfig(block_size=W, num_states=S, gate=gate, state_mlp=state_mlp,
                             state_mlp_dim=12)
  params = _init(cfg)
  x_prev, x = _x((2, W, E), seed=2), _x((2, 2 * W, E), seed=3)
  c0 = _x((2, S, E), seed=4)
  to_heads = lambda a, name: (a @ params[name]['kernel']).reshape(2, W, H, D)
  carried = {'started': jnp.ones((2,)), 'state': c0, 'window_keys': to_heads(x_prev, 'key'),
             'window_values': to_heads(x_prev, 'value')}
  y, variables = _run({'params': params, 'recurrent': carried}, x, cfg, mutable=('recurrent',))
  # Rows picked in numpy: eager jax indexing compiles a program per op and shape.
  x_prev, x, c0, y = np.asarray(x_prev), np.asarray(x), np.asarray(c0), np.asarray(y)
  for row in range(2):
    want, c = reference(params, np.concatenate([x_prev[row], x[row]]), cfg, c0[row],
                        num_previous=W)
    np.testing.assert_allclose(y[row], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(variables['recurrent']['state'])[row], c, rtol=1e-4,
                               atol=1e-5)


def test_fresh_start_matches_reference_and_zeros_mean_fresh():
  """No collection = a zeroed collection = the numpy loop from the learned initial state; the
  call then writes started = 1. A row whose leaves are zeroed restarts, the other continues."""
  params = _init()
  x = _x((2, 2 * W, E))
  y = _run({'params': params}, x)
  for row in range(2):
    np.testing.assert_allclose(y[row], reference(params, x[row], CFG)[0], rtol=1e-4, atol=1e-5)
  zeros = _fresh_collection(2)
  y_zero, written = _run({'params': params, 'recurrent': zeros}, x, mutable=('recurrent',))
  np.testing.assert_allclose(y_zero, y, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(written['recurrent']['started'], [1.0, 1.0])
  # Continue row 0, reset row 1 (the caller's reset: zero the row's leaves).
  reset = jax.tree.map(lambda a: a.at[1].set(0), written['recurrent'])
  y_next = _run({'params': params, 'recurrent': reset}, x, mutable=('recurrent',))[0]
  np.testing.assert_allclose(y_next[1], y[1], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(y_next[0] - y[0])).max() > 1e-3  # row 0 saw its past


def test_one_call_equals_block_by_block_calls_carried_in_the_collection():
  params = _init()
  x = _x((2, 3 * W, E))
  zeros = {'recurrent': _fresh_collection(2)}
  y_whole, whole = _run({'params': params, **zeros}, x, mutable=('recurrent',))
  carried, pieces = zeros, []
  for start in range(0, 3 * W, W):
    y, carried = _run({'params': params, **carried}, x[:, start:start + W], mutable=('recurrent',))
    pieces.append(y)
  np.testing.assert_allclose(np.concatenate(pieces, 1), y_whole, rtol=1e-5, atol=1e-5)
  for name in ('state', 'window_keys', 'window_values'):
    np.testing.assert_allclose(carried['recurrent'][name], whole['recurrent'][name], rtol=1e-5,
                               atol=1e-5)


def test_causal():
  params = _init()
  x = _x((4, 4 * W, E))
  t = W + 1  # mid-block: its own block's earlier token and later blocks (via the state) move
  y = _run({'params': params}, x)
  y2 = _run({'params': params}, x.at[0, t].add(1.0))
  np.testing.assert_allclose(y2[0, :t], y[0, :t], atol=1e-6)
  changed = np.abs(np.asarray(y2[0] - y[0])).max(-1)
  assert (changed[t:] > 1e-4).all(), changed


def test_prefill_and_steps_reproduce_whole_sequences():
  """Right-padded prompts ending mid-block (1, 6) and at block boundaries (4, 8), prefilled at a
  width that is not a multiple of W (9), then single steps across block boundaries."""
  params = _init()
  total, width, lengths = 4 * W, 2 * W + 1, jnp.asarray([1, W, W + 2, 2 * W])
  x = _x((4, total, E))
  want = _run({'params': params}, x)
  valid = jnp.arange(width)[None] < lengths[:, None]
  prompt = jnp.where(valid[..., None], x[:, :width], _x((4, width, E), seed=9))  # junk padding
  mask = (valid[:, None, :, None] & valid[:, None, None, :] &
          jnp.tril(jnp.ones((width, width), bool)))
  cache = jax.eval_shape(functools.partial(_run, decode='init', mutable=('cache',)),
                         {'params': params}, prompt)[1]
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), cache)  # as kv_cache.init_cache
  y, cache = _run({'params': params, **cache}, prompt, decode='prefill', mutable=('cache',),
                  mask=mask)
  # Slices and rows picked in numpy: eager jax indexing compiles a program per op and shape.
  y, want, x, lengths = np.asarray(y), np.asarray(want), np.asarray(x), np.asarray(lengths)
  for row, n in enumerate(lengths.tolist()):
    np.testing.assert_allclose(y[row, :n], want[row, :n], rtol=1e-4, atol=1e-5)

  rows = np.arange(4)
  for s in range(total - int(lengths.max())):
    position = lengths + s
    y, cache = _run({'params': params, **cache}, x[rows, position][:, None], decode='step',
                    mutable=('cache',), q_positions=position[:, None])
    np.testing.assert_allclose(np.asarray(y)[:, 0], want[rows, position], rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter_but_not_the_previous_call():
  """Finite, nonzero gradients to every parameter (gates, initial state, state positions);
  none into the carried state and window (truncated backprop across calls). Row 0 continues
  from the collection, row 1 starts fresh."""
  params = _init()
  x, weights = _x((2, 2 * W, E)), _x((2, 2 * W, E), seed=5)
  carried = {'started': jnp.asarray([1.0, 0.0]), 'state': _x((2, S, E), seed=6),
             'window_keys': _x((2, W, H, D), seed=7), 'window_values': _x((2, W, H, D), seed=8)}

  def loss(p, collection):
    y = _run({'params': p, 'recurrent': collection}, x, mutable=('recurrent',))[0]
    return jnp.sum(y * weights)

  grads, carried_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, carried)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(g)).all(), path
    assert np.abs(np.asarray(g)).max() > 0, f'no gradient to {jax.tree_util.keystr(path)}'
  for name, g in carried_grads.items():
    np.testing.assert_array_equal(g, 0, err_msg=name)
  assert br.parameter_count(CFG, E, H, D) == sum(a.size for a in jax.tree.leaves(params))


class _Stack(nn.Module):
  """Two layers under nn.scan, as the model stacks scan them ('recurrent' per layer)."""

  @nn.compact
  def __call__(self, x):
    def layer(module, carry, _):
      return carry + module(carry), None

    scanned = nn.scan(layer, variable_axes={'params': 0, 'recurrent': 0, 'cache': 0},
                      split_rngs={'params': True}, length=2,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
    return scanned(_layer(), x, None)[0]


def test_recurrent_collection_inside_scanned_layers():
  x = _x((2, 2 * W, E))
  # The scanned tree: each single-layer parameter with a leading layer axis (two layers differ).
  (name,) = jax.eval_shape(_Stack().init, jax.random.key(0), x[:, :W])['params']
  stack = jax.jit(lambda p: jax.tree.map(lambda a: jnp.stack([a, 0.8 * a]), p))  # one program
  params = {name: stack(_init())}
  y = jax.jit(_Stack().apply)({'params': params}, x)  # no collection: fresh, nothing written
  apply = jax.jit(functools.partial(_Stack().apply, mutable=['recurrent']))
  shapes = jax.eval_shape(apply, {'params': params}, x[:, :W])[1]
  states = [a for path, a in jax.tree_util.tree_leaves_with_path(shapes)
            if jax.tree_util.keystr(path).endswith("['state']")]
  assert [a.shape for a in states] == [(2, 2, S, E)]  # one state per layer, stacked
  carried = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
  y_first, carried = apply({'params': params, **carried}, x[:, :W])
  y_rest, _ = apply({'params': params, **carried}, x[:, W:])
  np.testing.assert_allclose(np.concatenate([y_first, y_rest], 1), y, rtol=1e-5, atol=1e-5)
