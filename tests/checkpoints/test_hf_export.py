"""save_hf writes what transformers wrote: the fixtures' own tensors come back name for name."""

import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from efficientlm.checkpoints.hf_export import save_hf
from efficientlm.checkpoints.hf_t5 import load_hf
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.models.layer_stacking import stack_layers
from tests import helpers
from tests.checkpoints.random_params import random_params

SWITCH_MOE = MoeConfig(4, layout='every', period=2, min_expert_capacity=8)


def _fixture_copy(fixtures_dir, name, tmp_path):
  """The fixture directory, except switch_tiny's stacks get one input table (shared.weight):
  transformers 5 saved it with three different ones, which our model cannot hold."""
  source = fixtures_dir / 'hf' / name
  if name != 'switch_tiny':
    return source
  tensors = load_file(str(source / 'model.safetensors'))
  for stack in ('encoder', 'decoder'):
    tensors[f'{stack}.embed_tokens.weight'] = tensors['shared.weight']
  directory = tmp_path / 'source'
  directory.mkdir()
  save_file(tensors, str(directory / 'model.safetensors'), metadata={'format': 'pt'})
  (directory / 'config.json').write_bytes((source / 'config.json').read_bytes())
  return directory


def _assert_same_tensors(a, b):
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _assert_identical_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('name', ['t5_v1_1_tiny', 't5_original_tiny', 'switch_tiny'])
def test_round_trip_rewrites_the_transformers_file(fixtures_dir, tmp_path, name):
  source = _fixture_copy(fixtures_dir, name, tmp_path)
  cfg, params = load_hf(source)
  out = save_hf(tmp_path / 'out', cfg, params)
  cfg_again, params_again = load_hf(out)
  assert cfg_again == cfg
  _assert_identical_trees(params_again, params)
  _assert_same_tensors(load_file(str(out / 'model.safetensors')),
                       load_file(str(source / 'model.safetensors')))
  # Every config field we write has the value transformers wrote, except the T5 tie flag:
  # transformers 5 writes true for every T5 (and ties lm_head only when the file lacks it).
  ours = json.loads((out / 'config.json').read_text())
  theirs = json.loads((source / 'config.json').read_text())
  differ = {k for k in ours if k in theirs and ours[k] != theirs[k]}
  assert differ == ({'tie_word_embeddings'} if name == 't5_v1_1_tiny' else set())
  assert not {'model_type', 'd_model', 'd_ff', 'num_heads', 'd_kv', 'vocab_size'} - set(ours)


@pytest.mark.parametrize('overrides,period', [
    (dict(), 1),
    (dict(mlp_activations=('relu',), moe=SWITCH_MOE), 2)])
def test_scanned_params_export_like_unscanned(tmp_path, overrides, period):
  """Scanned: jax leaves in the scanned model's own tree; unscanned: numpy leaves."""
  model = helpers.t5_model(num_encoder_layers=4, num_decoder_layers=4, **overrides)
  params = random_params(model)
  save_hf(tmp_path / 'unscanned', model.module.config, params)
  scanned_model = helpers.t5_model(num_encoder_layers=4, num_decoder_layers=4, scan_layers=True,
                                   **overrides)
  scanned = stack_layers(params, period)
  assert jax.tree.map(np.shape, random_params(scanned_model)) == jax.tree.map(np.shape, scanned)
  save_hf(tmp_path / 'scanned', scanned_model.module.config, scanned)
  _assert_same_tensors(load_file(str(tmp_path / 'scanned' / 'model.safetensors')),
                       load_file(str(tmp_path / 'unscanned' / 'model.safetensors')))
  assert json.loads((tmp_path / 'scanned' / 'config.json').read_text()) == json.loads(
      (tmp_path / 'unscanned' / 'config.json').read_text())


def test_bfloat16_leaves_stay_bfloat16(tmp_path):
  model = helpers.t5_model(param_dtype='bfloat16')
  params = random_params(model)
  out = save_hf(tmp_path, model.module.config, params)
  assert json.loads((out / 'config.json').read_text())['dtype'] == 'bfloat16'
  assert {v.dtype for v in load_file(str(out / 'model.safetensors')).values()} == {
      np.dtype(ml_dtypes.bfloat16)}
  _, again = load_hf(out)
  _assert_identical_trees(again, jax.tree.map(np.asarray, params))


def test_tied_switch_has_only_the_shared_table(tmp_path):
  model = helpers.t5_model(mlp_activations=('relu',), moe=SWITCH_MOE, logits_via_embedding=True)
  params = random_params(model)
  out = save_hf(tmp_path, model.module.config, params)
  names = set(load_file(str(out / 'model.safetensors')))
  assert 'shared.weight' in names and not any('embed_tokens' in n or 'lm_head' in n for n in names)
  hf = json.loads((out / 'config.json').read_text())
  assert hf['tie_word_embeddings'] and hf['model_type'] == 'switch_transformers'
  cfg, again = load_hf(out)
  assert cfg.logits_via_embedding and cfg.scale_tied_logits
  _assert_identical_trees(again, jax.tree.map(np.asarray, params))


@pytest.mark.parametrize('overrides,field', [
    (dict(num_encoder_layers=0), 'num_encoder_layers'),
    (dict(position_embedding='rotary'), 'position_embedding'),
    (dict(num_kv_heads=2), 'num_kv_heads'),
    (dict(scale_attention_logits=True), 'scale_attention_logits'),
    (dict(mlp_activations=('gelu', 'gelu')), 'mlp_activations'),
    (dict(mlp_activations=('gelu_exact', 'linear')), 'mlp_activations'),
    (dict(moe=dataclasses.replace(SWITCH_MOE, router='experts_choose')), 'moe.router'),
    (dict(moe=dataclasses.replace(SWITCH_MOE, num_selected_experts=2)),
     'moe.num_selected_experts'),
    (dict(moe=dataclasses.replace(SWITCH_MOE, renormalize_gates=True)), 'moe.renormalize_gates'),
    (dict(moe=SWITCH_MOE, mlp_activations=('gelu', 'linear')), 'mlp_activations'),
    (dict(moe=dataclasses.replace(SWITCH_MOE, expert_mlp_dim=8)), 'moe.expert_mlp_dim'),
    (dict(moe=MoeConfig(4, layout='explicit', encoder_layers=(0,))), 'moe.layout'),
    (dict(moe=MoeConfig(4, layout='every', period=3)), 'moe.layout'),
    (dict(moe=SWITCH_MOE, logits_via_embedding=True, scale_tied_logits=False),
     'scale_tied_logits'),
])
def test_unrepresentable_configs_name_the_field(tmp_path, overrides, field):
  base = dict(num_encoder_layers=4, num_decoder_layers=4,
              mlp_activations=('relu',) if 'moe' in overrides else ('gelu', 'linear'))
  cfg = dataclasses.replace(helpers.TINY_T5, **{**base, **overrides})
  with pytest.raises(ValueError, match=f'^{field} = '):
    save_hf(tmp_path, cfg, {})
  assert not (tmp_path / 'config.json').exists()
