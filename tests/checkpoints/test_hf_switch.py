"""Our MoE EncoderDecoder reproduces logits transformers computed for a SwitchTransformers file."""

import functools
import json
import re
import shutil

import jax

import numpy as np
import pytest

from efficientlm.checkpoints import hf_switch
from efficientlm.checkpoints.hf_layout import read_directory
from efficientlm.checkpoints.hf_t5 import from_hf_tensors, load_hf
from efficientlm.layers.moe import routing
from efficientlm.models.encoder_decoder import EncoderDecoder


def _one_input_embedding(tensors, name):
  """The fixture's tensors with `name` as the single input table (what our model can hold)."""
  out = {k: v for k, v in tensors.items() if '.embed_tokens.' not in k}
  out['shared.weight'] = tensors[name]
  return out


def test_logits_match_transformers(fixtures_dir):
  """transformers 5 saved this model (tie_word_embeddings false) with separate encoder and
  decoder input tables; the encoder runs with one and the decoder with the other."""
  directory = fixtures_dir / 'hf' / 'switch_tiny'
  hf, tensors = read_directory(directory)
  expected = np.load(directory / 'expected_logits.npz')
  cfg, enc_params = from_hf_tensors(
      hf, _one_input_embedding(tensors, 'encoder.embed_tokens.weight'), dtype='float32')
  _, dec_params = from_hf_tensors(
      hf, _one_input_embedding(tensors, 'decoder.embed_tokens.weight'), dtype='float32')
  assert (cfg.moe.layout, cfg.moe.period, cfg.moe.num_experts) == ('every', 2, 4)
  assert cfg.moe.min_expert_capacity == 64 and not cfg.logits_via_embedding
  assert cfg.mlp_activations == ('relu',)
  model = EncoderDecoder(cfg)
  enc_tokens = expected['encoder_input_tokens']
  encode = jax.jit(functools.partial(model.apply, method='encode'))
  decode = jax.jit(functools.partial(model.apply, method='decode'))
  logits = decode({'params': dec_params}, encode({'params': enc_params}, enc_tokens), enc_tokens,
                  expected['decoder_input_tokens'])
  np.testing.assert_allclose(logits, expected['logits'], rtol=1e-4, atol=1e-4)


def test_separate_input_embeddings_are_rejected(fixtures_dir):
  with pytest.raises(ValueError, match=r'switch_tiny: encoder.embed_tokens.weight and decoder'):
    load_hf(fixtures_dir / 'hf' / 'switch_tiny')


@pytest.mark.parametrize('layers,sparse,expected', [
    (12, 3, (1, 5, 9)),  # step 4
    (4, 2, (1, 3)),
    (4, 4, (0, 1, 2, 3)),  # step 1: all
    (6, 4, (0, 1, 2, 3, 4, 5)),  # 6 // 4 = 1: all
    (4, 0, (1,)),  # HF's "0 sparse layers" step is L: layer 1 is sparse
    (4, 5, ()),  # step 0: none
])
def test_sparse_layers_follow_transformers_rule(layers, sparse, expected):
  pattern = hf_switch.hf_sparse_layers(layers, sparse)
  assert tuple(i for i, s in enumerate(pattern) if s) == expected


def test_layouts_and_capacity_from_config(fixtures_dir):
  hf, tensors = read_directory(fixtures_dir / 'hf' / 'switch_tiny')
  tensors = _one_input_embedding(tensors, 'shared.weight')
  hf = dict(hf, num_layers=6, num_sparse_encoder_layers=2, num_decoder_layers=4,
            num_sparse_decoder_layers=2, expert_capacity=3)
  for i in (4, 5):  # layers 4 and 5 of the encoder: 6 // 2 = step 3 makes layer 4 sparse
    for n in ('0.SelfAttention.q', '0.SelfAttention.k', '0.SelfAttention.v', '0.SelfAttention.o',
              '0.layer_norm', '1.layer_norm'):
      tensors[f'encoder.block.{i}.layer.{n}.weight'] = tensors[f'encoder.block.1.layer.{n}.weight']
  for name in [k for k in tensors if k.startswith('encoder.block.1.layer.1.mlp.')]:
    tensors[name.replace('block.1.', 'block.4.')] = tensors[name]
  for name in [k for k in tensors if k.startswith('encoder.block.0.layer.1.mlp.')]:
    for i in (1, 3, 5):
      tensors[name.replace('block.0.', f'block.{i}.')] = tensors[name]
  cfg, params = from_hf_tensors(hf, tensors)
  assert (cfg.moe.layout, cfg.moe.encoder_layers, cfg.moe.decoder_layers) == (
      'explicit', (1, 4), (1, 3))
  assert 'expert' in params['encoder']['layers_4']['mlp']
  assert 'wi' in params['encoder']['layers_3']['mlp']
  # HF's capacity is expert_capacity per sequence whatever its length (ours caps it at T).
  for tokens in (1, 2, 3, 7, 64, 4096, 10**6):
    for factor in (cfg.moe.train_capacity_factor, cfg.moe.eval_capacity_factor):
      assert routing.expert_capacity(tokens, 4, factor, cfg.moe.min_expert_capacity) == min(
          3, tokens)


@pytest.mark.parametrize('field,value,match', [
    ('router_bias', True, 'router_bias'),
    ('router_dtype', 'bfloat16', 'router_dtype'),
    ('dense_act_fn', 'gelu_fast', 'dense_act_fn'),
    ('tie_word_embeddings', True, 'tie_word_embeddings'),
    ('model_type', 'bart', 'model_type'),
])
def test_unsupported_configs_name_directory_and_field(fixtures_dir, tmp_path, field, value, match):
  source = fixtures_dir / 'hf' / 'switch_tiny'
  shutil.copy(source / 'model.safetensors', tmp_path / 'model.safetensors')
  hf = json.loads((source / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps(dict(hf, **{field: value})))
  with pytest.raises(ValueError, match=re.escape(f'{tmp_path}: {match}')):
    load_hf(tmp_path)


def test_missing_config_field_is_named(fixtures_dir):
  hf, tensors = read_directory(fixtures_dir / 'hf' / 'switch_tiny')
  del hf['expert_capacity']
  with pytest.raises(ValueError, match='no field .expert_capacity'):
    from_hf_tensors(hf, tensors, 'here')
