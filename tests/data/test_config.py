"""DatasetConfig: validation, gin binding, and an import that loads no TensorFlow."""

import subprocess
import sys

import gin
import pytest

from efficientlm import gin_config
from efficientlm.data.config import DatasetConfig


def test_defaults_and_private_copy_of_lengths():
  lengths = {'targets': 64}
  cfg = DatasetConfig('synthetic_recall', lengths)
  lengths['targets'] = 1
  assert cfg.task_feature_lengths == {'targets': 64}
  assert (cfg.split, cfg.batch_size, cfg.shuffle, cfg.seed, cfg.pack, cfg.use_cached) == (
      'train', 8, True, 0, True, False)
  same = DatasetConfig('synthetic_recall', {'targets': 64})
  assert cfg == same and hash(cfg) == hash(same)
  assert hash(cfg) != hash(DatasetConfig('synthetic_recall', {'targets': 65}))


@pytest.mark.parametrize('kwargs,match', [
    (dict(batch_size=0), 'batch_size = 0'),
    (dict(batch_size=-8), 'batch_size = -8'),
    (dict(task_feature_lengths={'inputs': 512, 'targets': 0}), r"\['targets'\] = 0"),
    (dict(task_feature_lengths={'targets': 1.5}), r"\['targets'\] = 1.5"),
    (dict(task_feature_lengths={}), 'task_feature_lengths is empty'),
    (dict(mixture_or_task_name=''), 'mixture_or_task_name'),
])
def test_bad_values_are_named(kwargs, match):
  args = dict(mixture_or_task_name='c4_v220_lm', task_feature_lengths={'targets': 8}) | kwargs
  with pytest.raises(ValueError, match=match):
    DatasetConfig(**args)


def test_bound_from_gin():
  gin.clear_config()
  try:
    # The alias of configs/runs/*.gin: dynamic registration names the class after the alias of
    # its first import in the process, and later command-line bindings look it up by that name.
    gin.parse_config(['from __gin__ import dynamic_registration',
                      'from efficientlm.data import config as data_config',
                      'DATA = @data_config.DatasetConfig()',
                      "data_config.DatasetConfig.mixture_or_task_name = 'c4_v220_span_corruption'",
                      "data_config.DatasetConfig.task_feature_lengths = {'inputs': 512, "
                      "'targets': 114}",
                      'data_config.DatasetConfig.batch_size = 128'])
    cfg = gin_config.macro('DATA')
  finally:
    gin.clear_config()
  assert cfg == DatasetConfig('c4_v220_span_corruption', {'inputs': 512, 'targets': 114},
                              batch_size=128)


def test_config_import_loads_no_tensorflow():
  # A fresh interpreter: other tests in this process have imported TensorFlow already.
  code = ('import sys, efficientlm.data, efficientlm.data.config; '
          "heavy = {'tensorflow', 'seqio', 'tensorflow_datasets'} & set(sys.modules); "
          'assert not heavy, heavy')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr
