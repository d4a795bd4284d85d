"""Block-Recurrent Transformer layers in the models and the trainer: segments with carried state
against one long forward pass, decoding against full forward passes, state across training
steps (checkpointed, reset per row, resumed exactly), and the errors. The layer itself is
checked against the paper's equations in tests/layers/test_block_recurrent.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.errors import ConfigError
from efficientlm.inference import decoding
from efficientlm.layers.block_recurrent import BlockRecurrentConfig
from efficientlm.models.config import TransformerConfig
from efficientlm.models.model import RECURRENT
from efficientlm.training import trainer
from tests import helpers
from tests.training import fake_data, tiny_run

W = 4
BRT = dict(token_mixers=('block_window', 'block_recurrent'),
           block_recurrent=BlockRecurrentConfig(block_size=W, num_states=3, state_mlp_dim=16))


def _tokens(seed, batch, length, vocab=64):
  return jnp.asarray(np.random.default_rng(seed).integers(2, vocab, (batch, length)), jnp.int32)


def test_segments_with_carried_state_equal_one_long_pass():
  """Every layer is a block layer (no absolute positions anywhere), so a row cut into segments,
  each starting from the state and window the previous one left, gives the logits of the whole
  row in one call (scanned layers: the state carries a layer axis); a zeroed (reset) state gives the logits of the segment alone."""
  model = helpers.decoder_model(**BRT, carry_state=True, scan_layers=True)
  toks = _tokens(0, 2, 5 * W)
  params = helpers.init_params(model, {'decoder_input_tokens': toks[:, :2 * W]})
  forward = jax.jit(lambda p, t: model.module.apply({'params': p}, t))  # op by op costs more
  whole = forward(params, toks)
  spec = {'decoder_input_tokens': jax.ShapeDtypeStruct((2, 2 * W), jnp.int32)}
  state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), model.recurrent_spec(spec))
  apply = jax.jit(lambda p, t, s: model._apply_with_state(p, {'decoder_input_tokens': t}, None, s))
  pieces = []
  for start, stop in ((0, 2 * W), (2 * W, 3 * W), (3 * W, 5 * W)):
    logits, _, state = apply(params, toks[:, start:stop], state)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), whole, atol=2e-5)
  fresh = model.reset_recurrent(state, jnp.array([1, 0]))
  logits, _, _ = apply(params, toks[:, 5 * W - 2 * W:], fresh)
  alone = forward(params, toks[:, 3 * W:])
  np.testing.assert_allclose(logits[0], alone[0], atol=2e-5)
  assert np.abs(np.asarray(logits[1] - alone[1])).max() > 1e-3  # row 1 kept its past


def test_greedy_decoding_equals_argmax_of_full_forward_passes():
  """model.predict (prefill of right-padded prompts, then one token per step through blocks'
  boundaries) chooses what a full forward pass over each prefix chooses; a model of block layers
  only has no KV cache (the layers' windows and states are its whole cache)."""
  model = helpers.decoder_model(**BRT)
  params = helpers.init_params(model, {'decoder_input_tokens': _tokens(0, 1, 2 * W)})
  prompts = jnp.array([[5, 6, 7, 8, 9], [10, 11, 0, 0, 0]])
  out = model.predict(params, prompts, decoding.DecodeOptions(max_decode_length=7, eos_id=-1))
  forward = jax.jit(lambda p, t: model.module.apply({'params': p}, t))
  for row, length in ((0, 5), (1, 2)):
    sequence = [0] + list(np.asarray(prompts[row, :length]))
    for t in range(7):
      padded = sequence + [0] * (-len(sequence) % W)  # causal: right padding changes nothing
      logits = forward(params, jnp.asarray([padded], jnp.int32))[0, len(sequence) - 1]
      assert int(out.tokens[row, t]) == int(jnp.argmax(logits)), (row, t)
      sequence.append(int(out.tokens[row, t]))


def _train(model_dir, steps, **kwargs):
  args = dict(model=helpers.decoder_model(vocab_size=tiny_run.VOCAB, **BRT, carry_state=True),
              partitioner=tiny_run.partitioner(), model_dir=str(model_dir),
              train_dataset=fake_data.stream_source(tiny_run.BATCH, 2 * W, tiny_run.VOCAB),
              optimizer=tiny_run.adamw(), total_steps=steps, log_every=2, checkpoint_every=3,
              eval_dataset=None, eval_every=None, async_checkpointing=False)
  args.update(kwargs)
  return trainer.train(**args)


def _checkpoint(model_dir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = model_dir / 'checkpoints' / str(step)
  return {item: ocp.PyTreeCheckpointer().restore(path / item) for item in ('params', RECURRENT)}


@pytest.mark.slow
def test_state_crosses_training_steps_and_a_resumed_run_continues_it(tmp_path):
  """On the 2x4 mesh: the carried state is checkpointed with the run; stopping at step 3 and
  resuming to 6 gives the parameters and state of an uninterrupted run to 6 (documents span 3
  steps, so the resumed steps 3-5 reset the rows at 3 and continue them at 4 and 5). The saved
  state is live: every row started, values nonzero."""
  _train(tmp_path / 'whole', 6)
  _train(tmp_path / 'split', 4)
  _train(tmp_path / 'split', 6)
  whole, split = _checkpoint(tmp_path / 'whole', 6), _checkpoint(tmp_path / 'split', 6)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(split)):
    np.testing.assert_array_equal(a, b)
  state = _checkpoint(tmp_path / 'whole', 3)[RECURRENT]
  started = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)
             if 'started' in jax.tree_util.keystr(p)]
  assert started and all((s == 1).all() for s in started)
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(state))


def test_a_stateful_model_on_shuffled_batches_is_refused_with_the_fix(tmp_path):
  with pytest.raises(ConfigError, match='document_streams = True'):
    _train(tmp_path, 2, train_dataset=fake_data.source(tiny_run.BATCH, 2 * W, tiny_run.VOCAB))
  assert not (tmp_path / 'checkpoints').exists() or not list((tmp_path / 'checkpoints').iterdir())


@pytest.mark.parametrize('overrides, fix', [
    (dict(token_mixers=('block_recurrent',)), 'block_recurrent = @BlockRecurrentConfig()'),
    (dict(carry_state=True), 'set carry_state = False'),
    (dict(BRT, residual='reversible'), "set residual = 'standard'"),
    (dict(BRT, num_encoder_layers=2, encoder_token_mixers=('block_window',)),
     'encoder needs bidirectional mixing'),
])
def test_what_cannot_work_is_refused_at_config_time(overrides, fix):
  with pytest.raises(ValueError, match=fix):
    TransformerConfig(**dict(dict(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8,
                                  mlp_dim=32, num_encoder_layers=0, num_decoder_layers=2,
                                  position_embedding='rotary'), **overrides))


def test_lengths_that_blocks_do_not_divide_are_refused_with_the_fix():
  """Training and scoring on such rows are refused; initializing is not (parameters do not
  depend on the length, and inference initializes on a 1-token dummy)."""
  model = helpers.decoder_model(**BRT)
  batch = {'decoder_input_tokens': _tokens(0, 1, W + 1),
           'decoder_target_tokens': _tokens(1, 1, W + 1)}
  params = jax.eval_shape(lambda: helpers.init_params(
      model, {'decoder_input_tokens': _tokens(0, 1, 1)}))
  with pytest.raises(ValueError, match='not a multiple of block_size 4; pad or cut'):
    jax.eval_shape(model.loss_fn, params, batch)
