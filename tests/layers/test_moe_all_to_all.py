"""Dropless MoE under expert parallelism (layers/moe/expert_parallel.py) on 8 emulated devices:
the all_to_all emulation of ragged_all_to_all against a numpy model of jax's documented
semantics and transpose; the shard_map layer against the single-device layer (values, aux,
gradients); the collectives of the lowered and compiled programs; bytes sent against the
closed form."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from efficientlm import partitioning
from efficientlm.layers.moe import expert_parallel
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.layers.moe.layer import MoeLayer

D, F, E, K = 16, 32, 8, 2
BATCH, LENGTH = 8, 4  # 8 groups (one per sequence) of 4 tokens

MESHES = {'data2_expert4': ((2, 4), ('data', 'expert'), 'expert_parallel'),
          'data2_expert2_model2': ((2, 2, 2), ('data', 'expert', 'model'),
                                   'expert_tensor_parallel')}


# ----------------------------------------------------------------------------------------------
# 1. The emulated exchange.


def _numpy_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets,
                             recv_sizes):
  """jax.lax.ragged_all_to_all's docstring, one slice per peer: device s sends
  operand_s[input_offsets[s][j]:+send_sizes[s][j]] to j, which writes it at output_offsets[s][j]
  (an offset in the RECEIVER's buffer) for recv_sizes[j][s] rows."""
  results = [o.copy() for o in outputs]
  n = len(operands)
  for s in range(n):
    for j in range(n):
      assert recv_sizes[j][s] == send_sizes[s][j]
      rows = operands[s][input_offsets[s][j]:input_offsets[s][j] + send_sizes[s][j]]
      results[j][output_offsets[s][j]:output_offsets[s][j] + len(rows)] = rows
  return results


def test_emulated_exchange_matches_ragged_all_to_all_semantics_and_transpose():
  """4 peers, uneven sizes (zeros included), padding gaps between the sent slices, outputs
  prefilled (rows nobody writes keep their values); the gradient equals jax's transpose rule
  (the exchange with offsets and sizes swapped; written output rows get no gradient)."""
  n, rows, out_rows = 4, 10, 8
  send = np.array([[2, 0, 1, 3], [0, 0, 4, 1], [1, 2, 0, 0], [3, 1, 1, 2]])
  recv = send.T
  # Sent slices in peer order, one padding row after each nonempty slice.
  gaps = send + (send > 0)
  input_offsets = np.cumsum(gaps, axis=1) - gaps
  assert input_offsets[3, 3] + send[3, 3] == rows
  # Receiver j stacks sources in reverse order, leaving row 0 untouched.
  output_offsets = np.zeros_like(send)
  for j in range(n):
    at = 1
    for s in reversed(range(n)):
      output_offsets[s, j] = at
      at += send[s, j]
  rng = np.random.default_rng(0)
  operands = rng.normal(size=(n, rows, 3)).astype(np.float32)
  outputs = np.full((n, out_rows, 3), -1.0, np.float32)
  cotangent = rng.normal(size=(n, out_rows, 3)).astype(np.float32)
  expected = _numpy_ragged_all_to_all(operands, outputs, input_offsets, send, output_offsets,
                                      recv)
  # Transpose: the cotangent's received rows go back to the senders' slices.
  expected_operand_t = _numpy_ragged_all_to_all(
      cotangent, np.zeros_like(operands), output_offsets.T, recv, input_offsets.T, send)
  expected_output_t = cotangent.copy()
  for j in range(n):
    for s in range(n):
      expected_output_t[j, output_offsets[s, j]:output_offsets[s, j] + send[s, j]] = 0

  mesh = jax.make_mesh((n,), ('expert',), (AxisType.Auto,), devices=jax.devices()[:n])

  def exchange(operand, output, io, ss, oo, rs):
    return expert_parallel.emulated_ragged_all_to_all(operand, output, io, ss, oo, rs,
                                                      axis_name='expert', max_send=4)

  def local(operand, output, io, ss, oo, rs, t):
    args = (operand[0], output[0], io[0], ss[0], oo[0], rs[0])
    result, vjp = jax.vjp(lambda a, b: exchange(a, b, *args[2:]), *args[:2])
    return (result[None],) + tuple(g[None] for g in vjp(t[0]))

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P('expert'), out_specs=P('expert')))
  ints = [jnp.asarray(a, jnp.int32) for a in (input_offsets, send, output_offsets, recv)]
  result, operand_t, output_t = fn(operands, outputs, *ints, cotangent)
  np.testing.assert_array_equal(result, np.stack(expected))
  np.testing.assert_array_equal(operand_t, np.stack(expected_operand_t))
  np.testing.assert_array_equal(output_t, expected_output_t)


# ----------------------------------------------------------------------------------------------
# 2. The layer on expert meshes equals one device.


def _layer(exchange='auto'):
  return MoeLayer(MoeConfig(E, layout='all', dispatch='dropless', num_selected_experts=K,
                            dropless_exchange=exchange), F, ia3=True)


def _inputs():
  """Random parameters of the layer's shapes (no init program to compile). The (IA)3 vectors
  are random around 1, so each expert's rows must get their own."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, LENGTH, D)), jnp.float32)
  shapes = partitioning.unbox(jax.eval_shape(_layer().init, jax.random.key(1), x)['params'])
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) / np.sqrt(a.shape[-2]),
                                              jnp.float32), shapes)
  params['expert']['ia3_scale'] = jnp.asarray(rng.uniform(0.5, 1.5, (E, F)), jnp.float32)
  return params, x


def _step(layer):
  """(params, x) -> ((y, aux), (d loss / d params, d loss / d x)), one forward pass."""

  def loss(p, x):
    y, state = layer.apply({'params': p}, x, mutable=['moe'])
    aux = {name: value[0] for name, value in state['moe'].items()}
    return jnp.sum(jnp.sin(y)) + aux['load_balancing_loss'] + aux['router_z_loss'], (y, aux)

  def step(p, x):
    (_, outputs), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)
    return outputs, grads

  return step


@pytest.fixture(scope='module')
def reference():
  params, x = _inputs()
  return params, x, jax.jit(_step(_layer()))(params, x)


@pytest.fixture(scope='module')
def sharded_runs(reference):
  """Per mesh: the outputs and the compiled program's text (one compile for both)."""
  params, x, _ = reference
  runs = {}
  for name, (shape, axes, rules) in MESHES.items():
    partitioner = partitioning.Partitioner(shape, axes, rules)
    with partitioner.context():
      compiled = jax.jit(_step(_layer('emulated'))).lower(params, x).compile()
      runs[name] = compiled(params, x), compiled.as_text()
  return runs


@pytest.mark.parametrize('mesh', list(MESHES))
def test_expert_parallel_dropless_equals_single_device(mesh, reference, sharded_runs):
  *_, expected = reference
  got, _ = sharded_runs[mesh]
  (y, aux), grads = got
  (y_ref, aux_ref), grads_ref = expected
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  assert set(aux) == set(aux_ref)
  for name in aux:
    np.testing.assert_allclose(aux[name], aux_ref[name], rtol=1e-6, atol=1e-7, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads,
               grads_ref)


# ----------------------------------------------------------------------------------------------
# 3. The collectives.


def _collectives(hlo: str, kind: str) -> list[str]:
  """Shapes of the operands of every `kind` instruction of a compiled HLO text."""
  return [m.group(1) for m in re.finditer(rf'= (.+?) {kind}\(', hlo)]


def _full_token_arrays(shapes: list[str]) -> list[str]:
  """f32 arrays of a [tokens, d] or [tokens x k, d] activation of the whole batch."""
  tokens = BATCH * LENGTH
  full = {f'f32[{tokens},{D}]', f'f32[{tokens * K},{D}]', f'f32[{BATCH},{LENGTH},{D}]'}
  return [s for shape in shapes for s in re.findall(r'f32\[[\d,]*\]', shape) if s in full]


def test_lowered_ragged_program_has_the_exchanges_and_no_gathers(reference, sharded_runs):
  """The 'ragged' layer lowered for GPU (XLA:CPU cannot compile ragged_all_to_all): two ragged
  all-to-alls forward, two more (their transposes) in the backward, each receive buffer of the
  documented bound n N min(k, E_l) rows. The emulated program, compiled, has no all-gather and no
  all-reduce of a whole-batch [tokens, d] array; the GSPMD dropless program has both (so the
  check can fail)."""
  params, x, _ = reference
  partitioner = partitioning.Partitioner(*MESHES['data2_expert4'])
  layer = _layer('ragged')
  with partitioner.context():
    forward = jax.jit(lambda p, x: layer.apply({'params': p}, x, mutable=['moe']))
    fwd_text = forward.trace(params, x).lower(lowering_platforms=('cuda',)).as_text()
    grad_text = jax.jit(_step(layer)).trace(params, x).lower(
        lowering_platforms=('cuda',)).as_text()
    gspmd = jax.jit(lambda p, x: _layer('gspmd').apply({'params': p}, x, mutable=['moe']))
    gspmd_text = gspmd.lower(params, x).compile().as_text()
  calls = [line for line in grad_text.splitlines() if '@ragged_all_to_all' in line]
  assert fwd_text.count('@ragged_all_to_all') == 2 and len(calls) == 4
  n, local_tokens, local_experts = 4, BATCH * LENGTH // 8, E // 4
  bound = n * local_tokens * min(K, local_experts)
  dispatch = f'(tensor<{local_tokens * K}x{D}xf32>, tensor<{bound}x{D}xf32>'
  back = f'(tensor<{bound}x{D}xf32>, tensor<{local_tokens * K}x{D}xf32>'
  assert sum(dispatch in c for c in calls) == 2 and sum(back in c for c in calls) == 2
  assert 'all_gather' not in grad_text

  for mesh in MESHES:
    _, hlo = sharded_runs[mesh]
    assert _collectives(hlo, 'all-gather') == []
    assert _full_token_arrays(_collectives(hlo, 'all-reduce')) == []
    assert _collectives(hlo, 'all-to-all')  # the emulated exchange
  assert any(s.startswith('s32') for s in _collectives(gspmd_text, 'all-gather'))
  assert _full_token_arrays(_collectives(gspmd_text, 'all-reduce'))


# ----------------------------------------------------------------------------------------------
# 4. Bytes.


def test_bytes_sent_with_balanced_routing_equal_the_closed_form():
  """Measured: the send sizes of a run of the emulated exchange (rows each device sends to each
  expert-axis peer), with router probabilities forced so that every device's choices spread
  evenly over the experts. Rows a device keeps for its own experts do not cross the network.
  Closed form, each way: tokens x k x d x bytes x (n - 1) / n (the return all-to-all sends the
  same rows back). The static receive buffer in the lowered program (the bound) is checked in
  the test above; the emulation itself moves padded [n, S, d] buffers and is not what is
  counted here."""
  shape, axes, rules = MESHES['data2_expert4']
  partitioner = partitioning.Partitioner(shape, axes, rules)
  n, local_experts = shape[1], E // shape[1]
  # Token t of every group picks experts K t and K t + 1: each device's 4 tokens x 2 choices
  # cover the 8 experts once, so it sends 2 rows to each of the 4 devices.
  logits = np.zeros((BATCH, LENGTH, E), np.float32)
  for t in range(LENGTH):
    logits[:, t, K * t], logits[:, t, K * t + 1] = 5.0, 4.0
  probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, LENGTH, D)), jnp.float32)
  wi = [jnp.asarray(rng.normal(size=(E, D, F)), jnp.float32)]
  wo = jnp.asarray(rng.normal(size=(E, F, D)), jnp.float32)

  def run(x, wi, wo, probs):
    return expert_parallel.dropless(x, wi, wo, None, None, probs=probs, k=K,
                                    activations=('relu',), exchange='emulated',
                                    with_send_sizes=True)

  with partitioner.context():
    _, counts, _, send = jax.jit(run)(x, wi, wo, probs)
  send = np.asarray(send).reshape(shape + (n,))
  own = np.arange(n)[None, :, None] == np.arange(n)[None, None, :]  # expert coordinate == peer
  rows_sent = int(np.sum(np.where(own, 0, send)))
  bytes_per_float = 4
  closed_form = BATCH * LENGTH * K * D * bytes_per_float * (n - 1) // n
  assert rows_sent * D * bytes_per_float == closed_form
  np.testing.assert_array_equal(counts, np.full(E, BATCH * LENGTH * K // E))
  assert local_experts == 2 and np.all(send == 2)
