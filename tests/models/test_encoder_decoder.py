"""T5.1.1 encoder-decoder: T5X parameter names, packing, causality, scan equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from efficientlm import gin_config, partitioning
from efficientlm.models.layer_stacking import stack_layers
from tests import helpers
from tests.error_bounds import assert_within, logits_bound, transformer_reduction_length


def _real(batch, logits):
  """Logits at real target positions only: padding queries have fully masked rows."""
  return np.asarray(logits)[np.asarray(batch['decoder_target_tokens']) > 0]


def test_unscanned_tree_equals_a_real_t5x_checkpoint(fixtures_dir):
  """The tiny gin's parameters have exactly the names and shapes T5X wrote."""
  raw = (fixtures_dir / 't5x' / 'test_t5_tiny.checkpoint_0').read_bytes()
  t5x_target = serialization.msgpack_restore(raw)['optimizer']['target']
  gin_config.parse(['models/t5_1_1/tiny.gin'])
  model = gin_config.macro('MODEL')
  batch = model.dummy_batch(1, {'inputs': 4, 'targets': 3})
  ours = jax.eval_shape(lambda: partitioning.unbox(model.init(jax.random.key(0), batch)))
  assert helpers.param_shapes(ours['params']) == helpers.param_shapes(t5x_target)


def test_t5x_checkpoint_weights_run_forward(fixtures_dir):
  raw = (fixtures_dir / 't5x' / 'test_t5_tiny.checkpoint_0').read_bytes()
  params = serialization.msgpack_restore(raw)['optimizer']['target']
  gin_config.parse(['models/t5_1_1/tiny.gin'], ["ACTIVATION_DTYPE = 'float32'"])
  model = gin_config.macro('MODEL')
  batch = helpers.seq2seq_batch(0, 2, 6, 5, 32128)
  loss, metrics = jax.jit(model.loss_fn)(params, batch)
  assert np.isfinite(loss) and metrics['num_tokens'] == np.sum(batch['decoder_target_tokens'] > 0)


def test_decoder_is_causal_and_encoder_is_bidirectional():
  model = helpers.t5_model()
  batch = helpers.seq2seq_batch(0, 2, 7, 6, 64)
  params = helpers.init_params(model, batch)
  logits = jax.jit(model.logits)  # one program for the four calls (same shapes)
  base = logits(params, batch)
  later = helpers.bump(batch, 'decoder_input_tokens', (slice(None), 2), 64)  # row 0 pads from 3
  np.testing.assert_array_equal(logits(params, later)[:, :2], base[:, :2])
  assert np.abs(np.asarray(logits(params, later)[:, 2] - base[:, 2])).max() > 1e-5
  # Any encoder token reaches every real decoder position (through cross-attention).
  enc = helpers.bump(batch, 'encoder_input_tokens', (0, 3), 64)
  changed = _real(batch, logits(params, enc))[:3]  # row 0's three real positions
  assert np.all(np.abs(changed - _real(batch, base)[:3]).max(-1) > 1e-5)


def test_padding_in_the_encoder_is_ignored():
  model = helpers.t5_model()
  batch = helpers.seq2seq_batch(0, 2, 7, 6, 64)
  params = helpers.init_params(model, batch)
  padded = dict(batch, encoder_input_tokens=np.pad(batch['encoder_input_tokens'], ((0, 0), (0, 3))))
  logits = jax.jit(model.logits)
  np.testing.assert_allclose(_real(batch, logits(params, padded)),
                             _real(batch, logits(params, batch)), atol=1e-5)


def test_packed_examples_equal_separate_runs():
  model = helpers.t5_model()
  rng = np.random.default_rng(3)
  enc = [helpers.tokens(rng, (1, n), 64) for n in (3, 4)]
  tgt = [helpers.tokens(rng, (1, n), 64) for n in (2, 3)]

  def shift(t):
    return np.concatenate([[[0]], t[:, :-1]], axis=1).astype(np.int32)

  def single(i):
    return {'encoder_input_tokens': enc[i], 'decoder_input_tokens': shift(tgt[i]),
            'decoder_target_tokens': tgt[i]}

  def seg(lengths):
    return np.array([sum([[i + 1] * n for i, n in enumerate(lengths)], [])], np.int32)

  def pos(lengths):
    return np.array([sum([list(range(n)) for n in lengths], [])], np.int32)

  packed = {
      'encoder_input_tokens': np.concatenate(enc, 1),
      'decoder_input_tokens': np.concatenate([shift(t) for t in tgt], 1),
      'decoder_target_tokens': np.concatenate(tgt, 1),
      'encoder_segment_ids': seg((3, 4)), 'decoder_segment_ids': seg((2, 3)),
      'encoder_positions': pos((3, 4)), 'decoder_positions': pos((2, 3)),
  }
  params = helpers.init_params(model, packed)
  logits = jax.jit(model.logits)
  got = logits(params, packed)
  np.testing.assert_allclose(got[:, :2], logits(params, single(0)), atol=1e-5)
  np.testing.assert_allclose(got[:, 2:], logits(params, single(1)), atol=1e-5)


def test_scanned_t5_equals_unrolled():
  model = helpers.t5_model()
  batch = helpers.seq2seq_batch(1, 2, 5, 4, 64)
  params = helpers.init_params(model, batch)
  scanned = helpers.t5_model(scan_layers=True, remat_policy='full')
  # Same network, another program: they differ by float32 rounding, bounded by the reduction
  # lengths through the network and the magnitudes of the logits' terms (error_bounds).
  want, state = jax.jit(lambda p: model.module.apply(
      {'params': p}, **model._inputs(batch),  # pylint: disable=protected-access
      capture_intermediates=lambda module, _: module.name == 'decoder_norm',
      mutable=['intermediates']))(params)
  hidden = state['intermediates']['decoder']['decoder_norm']['__call__'][0]
  bound = logits_bound(hidden, params['decoder']['logits_dense']['kernel'],
                       transformer_reduction_length(model.module.config, 5, 4))
  assert_within(jax.jit(scanned.logits)(stack_layers(params), batch), want, bound)


def test_relative_position_bias_is_not_copied_per_example():
  model = helpers.t5_model()
  batch = helpers.seq2seq_batch(0, 8, 6, 5, 64)
  params = helpers.init_params(model, batch)
  shapes = helpers.intermediate_shapes(lambda p: model.logits(p, batch), params)
  heads = model.module.config.num_heads
  assert (1, heads, 6, 6) in shapes and (1, heads, 5, 5) in shapes
  per_example = [(8, heads, q, k) for q, k in ((6, 6), (5, 5))]
  assert not [s for s in shapes if s in per_example], 'bias copied per example'


def test_bfloat16_activations_stay_close_to_float32():
  batch = helpers.seq2seq_batch(2, 2, 5, 4, 64)
  model32 = helpers.t5_model()
  params = helpers.init_params(model32, batch)
  logits16 = jax.jit(helpers.t5_model(dtype='bfloat16').logits)(params, batch)
  assert logits16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(logits16, np.float32),
                             jax.jit(model32.logits)(params, batch), atol=0.1)
