"""Run mode `prune` end to end on a tiny decoder: the checkpoint it writes restores and decodes
through the normal path with the exact sparsity, the source is untouched, a resumed run equals
an uninterrupted one, a scanned model's result is stacked back, MoE experts are pruned one by
one, and user errors are refused."""

import hashlib
import json
import pathlib

import jax
import numpy as np
import pytest

from efficientlm.checkpoints.load import load_params
from efficientlm.checkpoints.source import flatten
from efficientlm.compression import plan
from efficientlm.compression import prune as prune_lib
from efficientlm.compression.progress import Progress
from efficientlm.errors import ConfigError
from efficientlm.inference.decoding import DecodeOptions
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.training import checkpoints as ckpt_lib
from tests.compression.tiny_model import BATCH, LENGTH, VOCAB, abstract, init_params, model_32
from tests.training import fake_data, tiny_run

PRUNED = ('mlp/wi', 'mlp/wo', 'self_attention/query', 'self_attention/key',
          'self_attention/value', 'self_attention/out')


def _run(model_dir, source, model=None, **kwargs):
  args = dict(model=model or model_32(), partitioner=tiny_run.partitioner(),
              model_dir=str(model_dir), source_checkpoint=str(source),
              calibration_dataset=fake_data.source(BATCH, LENGTH, VOCAB),
              calibration_sequences=32, block_size=16)
  args.update(kwargs)
  return prune_lib.prune(**args)


def _tree_digest(directory: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob('*')) if p.is_file()}


def _params(model_dir, model=None):
  return flatten(jax.device_get(load_params(str(model_dir), abstract(model or model_32()))[1]))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A source checkpoint (random weights, step 7) and its 50% SparseGPT pruning."""
  root = tmp_path_factory.mktemp('prune')
  params = init_params(model_32())
  checkpointer = ckpt_lib.Checkpointer(root / 'source' / 'checkpoints', keep=None,
                                       async_save=False)
  checkpointer.save(7, params, wait=True)
  checkpointer.close()
  before = _tree_digest(root / 'source')
  report = _run(root / 'pruned', root / 'source')
  return {'root': root, 'source': root / 'source', 'pruned': root / 'pruned', 'report': report,
          'source_digest': before, 'source_params': flatten(jax.device_get(params))}


def test_pruned_checkpoint_restores_decodes_and_has_the_exact_sparsity(run):
  assert _tree_digest(run['source']) == run['source_digest']  # the source is only read
  assert not (run['pruned'] / 'prune_progress').exists()
  step, restored, _ = load_params(str(run['pruned']), abstract(model_32()))
  assert step == 7
  params = flatten(jax.device_get(restored))
  for name, value in params.items():
    source = run['source_params'][name]
    if any(f'/{kernel}/kernel' in name for kernel in PRUNED):
      assert (value == 0).sum() == value.size // 2, name  # 50%: exactly, per kernel
      assert not np.array_equal(value[value != 0], source[value != 0]), name  # OBS updates
    else:  # embedding and norms
      np.testing.assert_array_equal(value, source, err_msg=name)
  model = model_32()
  out = model.predict(restored, np.array([[5, 6, 7, 8], [9, 10, 0, 0]], np.int32),
                      DecodeOptions(max_decode_length=4))
  assert out.tokens.shape[0] == 2 and np.isfinite(np.asarray(out.scores)).all()

  report = json.loads((run['pruned'] / prune_lib.REPORT_FILE).read_text())
  assert report == json.loads(json.dumps(run['report']))
  rows = report['kernels']
  assert len(rows) == 12 and report['sparsity'] == 0.5 and report['step'] == 7
  for row in rows:
    assert row['sparsity'] == 0.5 and row['tokens'] == 32 * LENGTH
    assert 0 < row['error'] < row['magnitude_error'], row


def test_magnitude_method_matches_magnitude_pruning_by_hand(run, tmp_path):
  report = _run(tmp_path, run['source'], method='magnitude', sparsity='2:4')
  params = _params(tmp_path)
  wo = run['source_params']['decoder/layers_1/mlp/wo/kernel']
  groups = np.abs(wo.T).reshape(32, 8, 4)  # [out, in / 4, 4]: the 2 smallest of each go
  zeros = np.argsort(np.argsort(groups, axis=-1, kind='stable'), axis=-1) < 2
  expected = np.where(zeros.reshape(32, 32).T, 0.0, wo)
  np.testing.assert_array_equal(params['decoder/layers_1/mlp/wo/kernel'], expected)
  assert all(r['error'] == r['magnitude_error'] for r in report['kernels'])


def test_an_interrupted_run_resumes_at_the_next_layer_and_equals_an_uninterrupted_one(
    run, tmp_path, monkeypatch, capsys):
  save = Progress.save

  def save_then_stop(self, *args, **kwargs):
    save(self, *args, **kwargs)
    raise KeyboardInterrupt  # as if the job were killed after layer 0

  monkeypatch.setattr(Progress, 'save', save_then_stop)
  with pytest.raises(KeyboardInterrupt):
    _run(tmp_path, run['source'])
  monkeypatch.undo()
  assert (tmp_path / 'prune_progress' / '1').exists()
  assert not (tmp_path / 'checkpoints').exists() or not any((tmp_path / 'checkpoints').iterdir())
  with pytest.raises(ConfigError, match=f'{tmp_path / "prune_progress"} holds an interrupted '
                     'pruning run with another configuration .*spec'):
    _run(tmp_path, run['source'], sparsity='2:4')
  capsys.readouterr()
  report = _run(tmp_path, run['source'])
  out = capsys.readouterr().out
  assert 'resuming pruning' in out and 'decoder/layers_0:' not in out
  assert 'prune [2/2] decoder/layers_1' in out
  assert report['kernels'] == run['report']['kernels']
  resumed, uninterrupted = _params(tmp_path), _params(run['pruned'])
  for name, value in uninterrupted.items():
    np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_a_scanned_model_gets_its_layers_stacked_back(run):
  """Pruning runs unscanned (the restore reads any layout by canonical names); a scanned model's
  result is stacked back into its own layout: layer i is slice i of the stacked array."""
  scanned = model_32(scan_layers=True, remat_policy='full')
  assert plan.work_model(scanned) == model_32()
  pruned = jax.device_get(load_params(str(run['pruned']), abstract(model_32()))[1])
  stacked = flatten(jax.device_get(plan.to_model_layout(pruned, scanned, abstract(scanned))))
  for name, value in flatten(pruned).items():
    if '/layers_' in name:
      index = int(name.split('/layers_')[1].split('/')[0])
      value_in_stack = stacked[name.replace(f'/layers_{index}/', '/layers/')][index]
      np.testing.assert_array_equal(value_in_stack, value, err_msg=name)
    else:
      np.testing.assert_array_equal(stacked[name], value, err_msg=name)


def test_experts_are_pruned_one_by_one_and_the_router_is_left_alone(tmp_path):
  moe = MoeConfig(4, layout='all', dispatch='dropless', grouped_matmul='ragged_dot')
  model = model_32(moe=moe, num_decoder_layers=1)  # one layer: one capture, no progress save
  before = init_params(model)
  checkpointer = ckpt_lib.Checkpointer(tmp_path / 'source' / 'checkpoints', keep=None,
                                       async_save=False)
  checkpointer.save(1, before, wait=True)
  checkpointer.close()
  report = _run(tmp_path / 'pruned', tmp_path / 'source', model=model, calibration_sequences=64)
  pruned = _params(tmp_path / 'pruned', model)
  experts = [r for r in report['kernels'] if r['kind'] == 'experts']
  assert [r['name'] for r in experts] == ['decoder/layers_0/mlp/expert/wi/kernel',
                                          'decoder/layers_0/mlp/expert/wo/kernel']
  for row in experts:
    kernel = pruned[row['name']]
    assert kernel.shape == (4, 32, 32)
    assert ((kernel == 0).sum(axis=(1, 2)) == 32 * 32 // 2).all()  # 50% in every expert
    assert row['error'] < row['magnitude_error']
  router = 'decoder/layers_0/mlp/router/router_weights/w/kernel'
  np.testing.assert_array_equal(pruned[router], np.asarray(flatten(before)[router]))


class _Padded:
  """Calibration rows with 2 real tokens each: 16 per batch of 8."""

  def __init__(self, index, count):
    self.inner = fake_data.CountingIterator(BATCH, LENGTH, VOCAB, 0, index, count)
    self.element_spec = self.inner.element_spec

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.inner)
    batch['decoder_target_tokens'][:, 2:] = 0
    return batch


def test_user_errors_are_refused_and_write_nothing(run, tmp_path):
  with pytest.raises(ConfigError, match='already holds checkpoints'):
    _run(run['pruned'], run['source'])
  with pytest.raises(ConfigError, match='lies inside MODEL_DIR'):
    _run(run['source'].parent, run['source'])
  with pytest.raises(ConfigError, match="METHOD = 'obs'"):
    _run(tmp_path, run['source'], method='obs')
  with pytest.raises(ConfigError, match=r"PRUNE_LAYER_KINDS = \('embeddings',\)"):
    _run(tmp_path, run['source'], layer_kinds=('embeddings',))
  with pytest.raises(ConfigError, match=r'(?s)no parameter took: \n  decoder/layers_1/.*must '
                     'describe the SOURCE_CHECKPOINT model exactly'):
    _run(tmp_path, run['source'], model=model_32(num_decoder_layers=1))
  with pytest.raises(ConfigError, match='INCLUDE_LOGITS = True, but this model computes its '
                     'logits with the embedding table'):
    _run(tmp_path, run['source'], include_logits=True)
  with pytest.raises(ConfigError, match='2:3 sparsity groups 3 consecutive inputs, but '
                     'decoder/layers_0/mlp/wi/kernel has 32 inputs'):
    _run(tmp_path, run['source'], sparsity='2:3')
  with pytest.raises(ConfigError, match=r'only 16 tokens for its 32 inputs.*at least 16 more '
                     r'tokens: raise CALIBRATION_SEQUENCES by about 8 \(it received 2 tokens'):
    _run(tmp_path, run['source'], calibration_dataset=_Padded, calibration_sequences=8)
  assert _tree_digest(run['source']) == run['source_digest']
  assert not (tmp_path / 'checkpoints').exists() or not any((tmp_path / 'checkpoints').iterdir())
