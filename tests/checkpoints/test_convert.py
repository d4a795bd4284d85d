"""scripts/convert_checkpoint.py: T5X -> efficientlm -> Hugging Face, config read off shapes."""

import json
import pathlib
import runpy

import numpy as np
import pytest
from flax import serialization

from efficientlm import partitioning
from efficientlm.checkpoints.convert import model_for
from efficientlm.checkpoints.formats import open_checkpoint
from efficientlm.checkpoints.infer_config import infer_t5_config
from efficientlm.checkpoints.restore import restore
from efficientlm.checkpoints.source import flatten
from efficientlm.checkpoints.upcycle import abstract_params
from efficientlm.models.config import TransformerConfig

SCRIPT = pathlib.Path(__file__).parents[2] / 'scripts' / 'convert_checkpoint.py'


def _script():
  return runpy.run_path(str(SCRIPT), run_name='convert_checkpoint')['main']


def _t5x(fixtures_dir):
  return fixtures_dir / 't5x' / 'test_t5_tiny.checkpoint_0'


def test_config_is_read_off_the_t5x_checkpoint(fixtures_dir):
  cfg = infer_t5_config(open_checkpoint(str(_t5x(fixtures_dir))))
  # The fixture README's description of the checkpoint.
  expected = TransformerConfig(vocab_size=32128, emb_dim=8, num_heads=4, head_dim=3,
                               mlp_dim=16, num_encoder_layers=2, num_decoder_layers=2,
                               mlp_activations=('gelu', 'linear'), logits_via_embedding=False,
                               scale_tied_logits=False, dtype='float32')
  assert cfg == expected


def test_t5x_to_efficientlm_and_on_to_hugging_face(fixtures_dir, tmp_path):
  main = _script()
  out = main(['--from', 't5x', '--to', 'efficientlm', '--input', str(_t5x(fixtures_dir)),
              '--output', str(tmp_path / 'ours')])
  source = open_checkpoint(str(out))
  assert source.format == 'efficientlm' and source.step == 0
  assert json.loads((out / 'model_config.json').read_text())['emb_dim'] == 8
  raw = serialization.msgpack_restore(_t5x(fixtures_dir).read_bytes())
  dense = flatten(raw['optimizer']['target'])
  abstract, _ = abstract_params(model_for(infer_t5_config(source)),
                                partitioning.Partitioner((-1,), ('data',), 'data_parallel'))
  params, _ = restore(source, abstract)
  for name, value in flatten(params).items():
    np.testing.assert_array_equal(np.asarray(value), dense[name], err_msg=name)
  with pytest.raises(FileExistsError, match='not empty'):
    main(['--to', 'efficientlm', '--input', str(_t5x(fixtures_dir)), '--output', str(out)])


def test_t5x_to_hugging_face_reads_back_as_the_t5x_weights(fixtures_dir, tmp_path):
  from efficientlm.checkpoints.hf_t5 import load_hf
  out = _script()(['--to', 'hf', '--input', str(_t5x(fixtures_dir)), '--output',
                   str(tmp_path / 'hf')])
  cfg, params = load_hf(out)
  assert cfg.emb_dim == 8 and not cfg.logits_via_embedding
  dense = flatten(serialization.msgpack_restore(_t5x(fixtures_dir).read_bytes())[
      'optimizer']['target'])
  ours = flatten(params)
  assert sorted(ours) == sorted(dense)
  for name, value in dense.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
