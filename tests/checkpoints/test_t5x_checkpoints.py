"""T5X checkpoints written by T5X itself (tests/fixtures/t5x) load into our models."""

import dataclasses
import gzip

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization
from jax.sharding import NamedSharding, PartitionSpec

from efficientlm import partitioning
from efficientlm.checkpoints import t5x_legacy
from efficientlm.checkpoints.formats import detect_format, open_checkpoint
from efficientlm.checkpoints.restore import restore
from efficientlm.checkpoints.source import flatten, place, unflatten
from efficientlm.checkpoints.upcycle import abstract_params
from efficientlm.models.config import TransformerConfig
from efficientlm.models.encoder_decoder import EncoderDecoder
from efficientlm.models.layer_stacking import unstack_layers
from efficientlm.models.model import EncoderDecoderModel
from tests import helpers

# The shapes of T5X's test_t5_tiny checkpoint (fixtures README).
TINY = TransformerConfig(vocab_size=32128, emb_dim=8, num_heads=4, head_dim=3, mlp_dim=16,
                         num_encoder_layers=2, num_decoder_layers=2, dtype='float32')


def _partitioner():
  return partitioning.Partitioner((2, 4), ('data', 'model'), 'tensor_parallel')


def _fixture_arrays(fixtures_dir):
  """The checkpoint's parameters as flax's own msgpack reader returns them."""
  raw = (fixtures_dir / 't5x' / 'test_t5_tiny.checkpoint_0').read_bytes()
  return flatten(serialization.msgpack_restore(raw)['optimizer']['target'])


@pytest.mark.parametrize('scan', [False, True])
def test_inline_checkpoint_loads_into_t5_1_1_and_runs(fixtures_dir, scan):
  path = fixtures_dir / 't5x' / 'test_t5_tiny.checkpoint_0'
  assert detect_format(str(path)) == 't5x'
  source = open_checkpoint(str(path))
  assert source.step == 0
  model = EncoderDecoderModel(EncoderDecoder(dataclasses.replace(TINY, scan_layers=scan)))
  partitioner = _partitioner()
  abstract, _ = abstract_params(model, partitioner)
  params, report = restore(source, abstract)
  assert not report.from_scratch and not report.unused
  # Sharded as the model wants (heads over 'model').
  query = params['encoder']['layers' if scan else 'layers_0']['attention']['query']['kernel']
  assert query.sharding.spec == abstract['encoder']['layers' if scan else 'layers_0'][
      'attention']['query']['kernel'].sharding.spec
  expected = _fixture_arrays(fixtures_dir)
  ours = flatten(params)
  if scan:
    ours = flatten(unstack_layers(jax.device_get(params)))
  assert sorted(ours) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(np.asarray(ours[name]), value, err_msg=name)
  batch = helpers.seq2seq_batch(0, 2, 7, 5, 32)
  logits = jax.jit(model.logits)(params, batch)
  assert logits.shape == (2, 5, 32128) and np.all(np.isfinite(logits))


def test_tensorstore_checkpoint_reads_the_right_values(fixtures_dir):
  directory = fixtures_dir / 't5x' / 'tiny_t5' / 'checkpoint_1'
  source = t5x_legacy.open_t5x(str(directory), with_optimizer_state=True)
  assert source.step == 1
  leaves = source.leaves
  # The zarr chunk decoded by hand: gzip of the little-endian C-order array (zarr v2).
  raw = gzip.decompress((directory / 'state.param_states.kernel' / '0.0').read_bytes())
  kernel = np.frombuffer(raw, '<f8').reshape(10, 5)
  assert leaves['state/param_states/kernel'].dtype == np.float64
  np.testing.assert_array_equal(leaves['state/param_states/kernel'].read(()), kernel)
  np.testing.assert_array_equal(leaves['state/param_states/bias'].read(()), np.ones(5))
  assert int(leaves['state/param_states/step'].read(())) == 1
  # Each device reads its own rows: a sharded placement equals the whole array.
  mesh = jax.make_mesh((2, 4), ('a', 'b'))
  placed = place(leaves['state/param_states/kernel'],
                 NamedSharding(mesh, PartitionSpec('a', None)), np.float32)
  assert placed.dtype == np.float32 and len(placed.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(placed), kernel.astype(np.float32))


def test_tensorstore_specs_resolve_to_local_and_gcs_paths():
  spec = {'driver': 'zarr', 'dtype': 'bfloat16',
          'kvstore': {'driver': 'gfile', 'path': 'target.encoder.layers_0.mlp.wi_0.kernel/'},
          'metadata': {'shape': [768, 2048]}}
  local = t5x_legacy.resolve_spec(spec, '/ckpts/checkpoint_5')
  assert local['kvstore'] == {'driver': 'file',
                              'path': '/ckpts/checkpoint_5/target.encoder.layers_0.mlp.wi_0.kernel/'}
  # T5X writes gcs specs with a placeholder bucket; the real one comes from the gs:// path.
  gcs_spec = dict(spec, kvstore={'driver': 'gcs', 'bucket': 't5x-dummy-bucket',
                                 'path': 'target.token_embedder.embedding/'})
  remote = t5x_legacy.resolve_spec(
      gcs_spec, 'gs://t5-data/pretrained_models/t5x/t5_1_1_base/checkpoint_1000000')
  assert remote['kvstore'] == {
      'driver': 'gcs', 'bucket': 't5-data',
      'path': 'pretrained_models/t5x/t5_1_1_base/checkpoint_1000000/'
              'target.token_embedder.embedding/'}
  assert spec['kvstore']['driver'] == 'gfile'  # the input is not modified
  with pytest.raises(ValueError, match='s3'):
    t5x_legacy.resolve_spec(dict(spec, kvstore={'driver': 's3', 'path': 'x'}), '/c')


def test_t5x_orbax_layout_loads(fixtures_dir, tmp_path):
  # T5X's Orbax format stores T5X's state dict ({'target': params, 'state': ...}) as one PyTree.
  # No checkpoint written by T5X in this format is available here: this one is written by Orbax
  # with that layout, with the fixture's parameters.
  arrays = _fixture_arrays(fixtures_dir)
  tree = {'target': unflatten(arrays), 'state': {'step': np.int32(7)}}
  ocp.PyTreeCheckpointer().save(tmp_path / 'checkpoint_7', tree)
  path = str(tmp_path / 'checkpoint_7')
  assert detect_format(path) == 't5x_orbax'
  source = open_checkpoint(path)
  assert source.step == 7 and sorted(source.leaves) == sorted(arrays)
  abstract, _ = abstract_params(EncoderDecoderModel(EncoderDecoder(TINY)), _partitioner())
  params, _ = restore(source, abstract)
  for name, value in flatten(params).items():
    np.testing.assert_array_equal(np.asarray(value), arrays[name], err_msg=name)


def test_shapes_that_do_not_fit_name_the_parameter(fixtures_dir):
  model = EncoderDecoderModel(EncoderDecoder(dataclasses.replace(TINY, mlp_dim=32)))
  abstract, _ = abstract_params(model, _partitioner())
  source = open_checkpoint(str(fixtures_dir / 't5x' / 'test_t5_tiny.checkpoint_0'))
  with pytest.raises(ValueError, match=r'encoder/layers_0/mlp/wi_0/kernel: the model wants '
                                       r'shape \(8, 32\), checkpoint array .* has \(8, 16\)'):
    restore(source, abstract)


def test_missing_path_and_unknown_format_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    open_checkpoint(str(tmp_path / 'nowhere'))
  (tmp_path / 'notes.txt').write_text('not a checkpoint')
  with pytest.raises(ValueError, match=f'Unknown checkpoint format at {tmp_path}'):
    open_checkpoint(str(tmp_path))
  with pytest.raises(ValueError, match='not a T5X msgpack checkpoint'):
    open_checkpoint(str(tmp_path / 'notes.txt'), 't5x')
  with pytest.raises(ValueError, match="Unknown checkpoint format 'keras'"):
    open_checkpoint(str(tmp_path), 'keras')
