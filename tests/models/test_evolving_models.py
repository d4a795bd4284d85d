"""Evolving attention wired into the models (TransformerConfig.evolving_attention): against the
plain model, across scan/unrolled, causal, and the errors of what it cannot do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.layers.evolving_attention import EvolvingAttentionConfig
from efficientlm.models.config import TransformerConfig
from efficientlm.models.layer_stacking import stack_layers
from tests import helpers
from tests.training import tiny_run

EVOLVING = EvolvingAttentionConfig(alpha=0.4, beta=0.6)


def _without_evolving(params):
  """The plain model's tree: every `evolving` subtree dropped."""
  if not isinstance(params, dict):
    return params
  return {k: _without_evolving(v) for k, v in params.items() if k != 'evolving'}


@pytest.mark.parametrize('arch', ['decoder', 't5'])
def test_identity_mixing_is_the_plain_model(arch):
  """alpha = beta = 0 makes (E1) and (E2) the identity: the logits of the same weights without
  evolving attention (an independent model), through encoder, decoder and cross-attention."""
  make = helpers.decoder_model if arch == 'decoder' else helpers.t5_model
  evolving = make(evolving_attention=EvolvingAttentionConfig(alpha=0.0, beta=0.0))
  plain = make()
  vocab = plain.module.config.vocab_size
  batch = (helpers.lm_batch(0, 2, 10, vocab) if arch == 'decoder' else
           helpers.seq2seq_batch(0, 2, 9, 7, vocab))
  params = helpers.init_params(evolving, batch)
  assert 'evolving' in params['decoder']['layers_1']['self_attention']
  np.testing.assert_allclose(jax.jit(evolving.logits)(params, batch),
                             jax.jit(plain.logits)(_without_evolving(params), batch), rtol=1e-6,
                             atol=1e-6)


def test_the_logits_path_changes_the_model_and_stays_causal():
  model = helpers.decoder_model(evolving_attention=EVOLVING)
  batch = helpers.lm_batch(0, 2, 10, 64)
  params = helpers.init_params(model, batch)
  logits_fn = jax.jit(model.logits)  # one program for both batches
  logits = logits_fn(params, batch)
  plain = jax.jit(helpers.decoder_model().logits)(_without_evolving(params), batch)
  assert np.abs(np.asarray(logits - plain)).max() > 1e-3  # the mixing is not a no-op
  t = 6
  changed = logits_fn(params, helpers.bump(batch, 'decoder_input_tokens', (slice(None), t), 64))
  np.testing.assert_array_equal(changed[:, :t], logits[:, :t])
  assert np.abs(np.asarray(changed[:, t] - logits[:, t])).max() > 1e-4


@pytest.mark.parametrize('arch', ['decoder'])  # T5's stacks carry the state the same way
def test_scanned_equals_unrolled(arch):
  """The scanned stack carries zeros and has_previous = 0 into its first layer: same loss and
  gradients as the unrolled stack, where the first layer gets no previous logits."""
  make = helpers.decoder_model if arch == 'decoder' else helpers.t5_model
  unrolled = make(evolving_attention=EVOLVING, num_decoder_layers=3)
  scanned = make(evolving_attention=EVOLVING, num_decoder_layers=3, scan_layers=True)
  vocab = unrolled.module.config.vocab_size
  batch = (helpers.lm_batch(0, 2, 8, vocab) if arch == 'decoder' else
           helpers.seq2seq_batch(0, 2, 6, 8, vocab))
  params = helpers.init_params(unrolled, batch)
  helpers.assert_scanned_equals_unrolled(scanned, stack_layers(params), unrolled, params, batch)


def test_what_it_cannot_do_is_an_error():
  with pytest.raises(ValueError, match="evolving_attention .* attention_implementation 'xla'"):
    TransformerConfig(evolving_attention=EVOLVING, attention_implementation='pallas')
  model = helpers.decoder_model(evolving_attention=EVOLVING)
  batch = helpers.lm_batch(0, 1, 6, 64)
  params = helpers.init_params(model, batch)
  with pytest.raises(ValueError, match='evolving_attention cannot decode with a KV cache'):
    model.predict(params, jnp.asarray(batch['decoder_target_tokens'][:, :3]))


@pytest.mark.parametrize('rules', ['tensor_parallel', 'fsdp'])
def test_every_partitioning_rule_set_replicates_the_convolutions(rules):
  """The [K, K, heads, heads] kernels carry four distinct logical axes that every rule set
  maps to no mesh axis (under the main rule sets); initialized into sharded buffers as the trainer does (a repeated axis
  name, as first written, failed there) and applied under the mesh."""
  model = helpers.decoder_model(evolving_attention=EVOLVING)
  batch = helpers.lm_batch(0, 8, 8, 64)
  part = tiny_run.partitioner(rules=rules, axes=('data', 'fsdp' if rules != 'tensor_parallel'
                                                 else 'model'))
  params, shardings, _ = part.sharded_init(model.init, jax.random.key(0), batch)
  evolving = shardings['params']['decoder']['layers_1']['self_attention']['evolving']
  assert evolving['kernel'].spec == jax.sharding.PartitionSpec(None, None, None, None)
  with part.context():
    logits = jax.jit(model.logits)(params['params'], batch)
  unsharded = jax.jit(model.logits)(helpers.init_params(model, batch), batch)
  np.testing.assert_allclose(logits, unsharded, rtol=1e-5, atol=1e-5)
