"""Models we export load in transformers without missing or unexpected weights and compute our
logits. Runs only where torch and transformers import (pip install -e .[hf])."""

import dataclasses

import jax
import numpy as np
import pytest

from efficientlm.checkpoints import hf_switch
from efficientlm.checkpoints.hf_export import save_hf
from efficientlm.layers.moe.config import MoeConfig
from tests import helpers
from tests.checkpoints.random_params import random_params

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

SWITCH = MoeConfig(4, layout='every', period=2, min_expert_capacity=16,
                   train_capacity_factor=hf_switch.CAPACITY_FACTOR,
                   eval_capacity_factor=hf_switch.CAPACITY_FACTOR)
CASES = {
    't5_v1_1': dict(),  # gated GELU, untied logits
    't5_original': dict(mlp_activations=('relu',), logits_via_embedding=True,
                        scale_tied_logits=True),
    'switch': dict(mlp_activations=('relu',), moe=SWITCH),
    'switch_tied': dict(mlp_activations=('relu',), moe=SWITCH, logits_via_embedding=True),
    # HF: num_sparse 1 (step 4) in the encoder, num_sparse 5 (step 0: none) in the decoder.
    'switch_encoder_layer_1': dict(mlp_activations=('relu',), moe=dataclasses.replace(
        SWITCH, layout='explicit', encoder_layers=(1,), decoder_layers=())),
    # 12 tokens, 4 experts x 2 slots: tokens are dropped, per sequence in position order.
    'switch_dropping': dict(mlp_activations=('relu',),
                            moe=dataclasses.replace(SWITCH, min_expert_capacity=2)),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_transformers_computes_our_logits(tmp_path, name):
  model = helpers.t5_model(num_encoder_layers=4, num_decoder_layers=4, **CASES[name])
  batch = helpers.seq2seq_batch(3, 2, 12, 8, 64)
  params = random_params(model, seed=len(name))
  inputs = {k: batch[k] for k in ('encoder_input_tokens', 'decoder_input_tokens')}
  ours = np.asarray(jax.jit(model.logits)(params, inputs))
  if name == 'switch_dropping':  # the drops change the logits
    full = helpers.t5_model(num_encoder_layers=4, num_decoder_layers=4, **CASES['switch'])
    assert np.abs(np.asarray(jax.jit(full.logits)(params, inputs)) - ours).max() > 1e-2
  save_hf(tmp_path, model.module.config, params)
  hf_model, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(
      tmp_path, attn_implementation='eager', output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  enc = torch.from_numpy(batch['encoder_input_tokens'].astype(np.int64))
  with torch.no_grad():
    dec = torch.from_numpy(batch['decoder_input_tokens'].astype(np.int64))
    theirs = hf_model.eval()(input_ids=enc, attention_mask=enc != 0,
                             decoder_input_ids=dec).logits.numpy()
  print(f'{name}: max |ours - transformers| = {np.abs(ours - theirs).max():.2g}')
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
