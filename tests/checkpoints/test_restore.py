"""Restoring into a changed model: assignment maps, scratch fallback, strict mode, dtype casts,
scanned <-> unscanned, and our own checkpoints with and without optimizer state."""

import jax
import ml_dtypes
import numpy as np
import pytest

from efficientlm import partitioning
from efficientlm.checkpoints.formats import open_checkpoint
from efficientlm.checkpoints.restore import RestoreOptions, partitioned_initializer, restore
from efficientlm.checkpoints.source import flatten, from_tree, unflatten
from efficientlm.checkpoints.upcycle import abstract_params
from efficientlm.models.layer_stacking import stack_layers, unstack_layers
from efficientlm.training.checkpoints import Checkpointer
from tests import helpers


def _setup(**overrides):
  model = helpers.t5_model(**overrides)
  partitioner = partitioning.Partitioner((2, 4), ('data', 'model'), 'tensor_parallel')
  abstract, init_params = abstract_params(model, partitioner)
  initializer = partitioned_initializer(partitioner, init_params, jax.random.key(3))
  return model, partitioner, abstract, initializer


def _random_tree(abstract, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(dtype), abstract)


def _equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_assignment_map_renames_and_none_starts_from_scratch():
  _, _, abstract, initializer = _setup()
  stored = flatten(_random_tree(abstract))
  # A checkpoint whose attention is called `attn` and which lacks nothing.
  renamed = {k.replace('/attention/', '/attn/'): v for k, v in stored.items()}
  options = RestoreOptions(assignment_map=[(r'(.*)/attention/(.*)', r'\1/attn/\2'),
                                           (r'decoder/relpos_bias/.*', None)])
  params, report = restore(from_tree('mem', 'test', unflatten(renamed)), abstract, options,
                           initializer)
  flat = flatten(params)
  fresh = initializer(['decoder/relpos_bias/rel_embedding'])
  assert report.from_scratch == ['decoder/relpos_bias/rel_embedding']
  assert report.unused == ['decoder/relpos_bias/rel_embedding']
  for name, value in flat.items():
    expected = (fresh[name] if name.startswith('decoder/relpos_bias')
                else stored[name])
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=name)
  assert report.loaded['encoder/layers_1/attention/query/kernel'] == (
      'encoder/layers_1/attn/query/kernel')


def test_missing_parameters_need_fallback_and_strict_lists_every_mismatch():
  _, _, abstract, initializer = _setup()
  stored = flatten(_random_tree(abstract))
  del stored['encoder/layers_0/mlp/wo/kernel'], stored['decoder/decoder_norm/scale']
  stored['decoder/extra/kernel'] = np.zeros(3, np.float32)
  source = from_tree('mem', 'test', unflatten(stored))
  with pytest.raises(ValueError, match=r'lacks 2 model parameters.*\n  decoder/decoder_norm/scale'
                                       r'\n  encoder/layers_0/mlp/wo/kernel'):
    restore(source, abstract, RestoreOptions(), initializer)
  params, report = restore(source, abstract, RestoreOptions(fallback_to_scratch=True),
                           initializer)
  assert report.from_scratch == ['decoder/decoder_norm/scale', 'encoder/layers_0/mlp/wo/kernel']
  assert report.unused == ['decoder/extra/kernel']
  np.testing.assert_array_equal(np.asarray(params['decoder']['decoder_norm']['scale']),
                                np.ones(16))  # RMSNorm scales start at one
  with pytest.raises(ValueError, match=r'(?s)Strict.*lacks:.*encoder/layers_0/mlp/wo/kernel.*'
                                       r'no parameter took:.*decoder/extra/kernel'):
    restore(source, abstract, RestoreOptions(fallback_to_scratch=True, strict=True),
            initializer)


def test_values_are_cast_to_the_parameter_dtype():
  _, _, abstract, _ = _setup()
  stored = _random_tree(abstract, dtype=ml_dtypes.bfloat16)
  params, report = restore(from_tree('mem', 'test', stored), abstract)
  assert {v for v in report.cast.values()} == {('bfloat16', 'float32')}
  for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(stored)):
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(ours), theirs.astype(np.float32))


def test_bad_assignment_map_is_rejected():
  with pytest.raises(ValueError, match='not a regex'):
    RestoreOptions(assignment_map=[('(', 'x')])
  with pytest.raises(ValueError, match='pattern, replacement'):
    RestoreOptions(assignment_map=[('a', 'b', 'c')])


@pytest.mark.parametrize('from_scan,to_scan', [(True, False), (False, True), (True, True)])
def test_own_checkpoints_cross_scanned_and_unscanned(tmp_path, from_scan, to_scan):
  _, _, writer_abstract, _ = _setup(scan_layers=from_scan)
  _, _, reader_abstract, _ = _setup(scan_layers=to_scan)
  written = jax.tree.map(jax.numpy.asarray, _random_tree(writer_abstract))
  checkpointer = Checkpointer(tmp_path / 'checkpoints', async_save=False)
  checkpointer.save(4, written)  # parameters only (as upcycling and conversion write)
  checkpointer.close()
  source = open_checkpoint(str(tmp_path))
  assert source.format == 'efficientlm' and source.step == 4
  params, _ = restore(source, reader_abstract)
  # layer_stacking's own conversion is the reference for what the other layout holds.
  host = jax.device_get(written)
  expected = (unstack_layers(host) if from_scan and not to_scan else
              stack_layers(host) if to_scan and not from_scan else host)
  _equal(params, expected)
  for value, abstract in zip(jax.tree.leaves(params), jax.tree.leaves(reader_abstract)):
    assert value.sharding.spec == abstract.sharding.spec


def test_own_checkpoint_with_optimizer_state_restores_its_parameters(tmp_path):
  _, _, abstract, _ = _setup()
  written = jax.tree.map(jax.numpy.asarray, _random_tree(abstract))
  opt_state = {'mu': jax.tree.map(jax.numpy.zeros_like, written)}
  checkpointer = Checkpointer(tmp_path / 'checkpoints', async_save=False)
  checkpointer.save(2, written, opt_state)
  checkpointer.close()
  params, report = restore(open_checkpoint(str(tmp_path / 'checkpoints' / '2')), abstract)
  assert not report.unused  # optimizer slots are not parameters
  _equal(params, written)


def test_own_checkpoint_from_a_relative_path(tmp_path, monkeypatch):
  # Orbax needs absolute paths; a user's `CHECKPOINT_PATH='runs/x'` must still work.
  _, _, abstract, _ = _setup()
  written = jax.tree.map(jax.numpy.asarray, _random_tree(abstract))
  checkpointer = Checkpointer(tmp_path / 'run' / 'checkpoints', async_save=False)
  checkpointer.save(4, written)
  checkpointer.close()
  monkeypatch.chdir(tmp_path)
  params, _ = restore(open_checkpoint('run'), abstract)
  _equal(params, written)
