"""(IA)3 fine-tuning (training/parameter_efficient.py): only the vectors train and are checkpointed,
the base stays bit-identical and untouched on disk, resume equals an uninterrupted run, merged
checkpoints equal the unmerged model, and a base of other shapes stops with both named."""

import hashlib
import json
import pathlib
import shutil

import jax
import numpy as np
import optax
import pytest

from efficientlm.checkpoints import ia3_checkpoint
from efficientlm.checkpoints.source import flatten
from efficientlm.errors import ConfigError
from efficientlm.layers import ia3
from efficientlm.training import checkpoints, integrity, optimizers
from efficientlm.training import parameter_efficient as peft
from efficientlm.training.steps import TrainState, make_train_step
from tests import helpers
from tests.training import tiny_run

VOCAB, LENGTH, BATCH = tiny_run.VOCAB, tiny_run.LENGTH, tiny_run.BATCH


def _model(with_ia3=True, **overrides):
  return helpers.decoder_model(vocab_size=VOCAB, ia3=with_ia3, **overrides)


def _adafactor():
  """T-Few's optimizer (runs/ia3_finetune.gin), a larger rate so that a few steps move."""
  return optimizers.adafactor(optimizers.warmup_linear_decay_schedule(3e-2, 1, 10),
                              max_grad_norm=1.0)


def _write_base(directory: pathlib.Path, model, seed: int):
  """A parameters-only checkpoint of random values for `model`; (its directory, the values)."""
  batch = helpers.lm_batch(0, BATCH, LENGTH, VOCAB)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype),
                        jax.eval_shape(lambda: helpers.init_params(model, batch)))
  writer = checkpoints.Checkpointer(directory / 'checkpoints', keep=None, async_save=False)
  writer.save(0, params)
  writer.close()
  return directory, params


def _digests(directory: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob('*')) if p.is_file()}


def _meta(step_dir: pathlib.Path) -> dict:
  return integrity.unseal(json.loads((step_dir / 'meta' / 'metadata').read_text()))


def _train(model_dir, steps, **kwargs):
  return tiny_run.train(model_dir, steps, **dict(dict(
      model=_model(), optimizer=_adafactor(), checkpoint_every=2, keep_checkpoints=None,
      async_checkpointing=False), **kwargs))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A base checkpoint (random parameters), another of the same shapes, and a 4-step (IA)3 run
  on the first (checkpoints 2 and 4)."""
  root = tmp_path_factory.mktemp('ia3')
  base, values = _write_base(root / 'base', _model(False), seed=1)
  other, _ = _write_base(root / 'other_base', _model(False), seed=2)
  before = _digests(base)
  _train(root / 'run', 4, base_checkpoint=str(base))
  return dict(root=root, base=base, base_values=values, other=other, run=root / 'run',
              base_digests=before)


def test_one_step_trains_only_the_vectors_and_leaves_the_base_bit_identical():
  """The step as the trainer jits it (state donated, frozen base an argument) against a step of
  the whole (IA)3 model: plain SGD moves each parameter by its own gradient, so the vectors must
  move exactly as they do when every parameter trains."""
  model, partitioner = _model(), tiny_run.partitioner()
  batch = partitioner.shard_batch(helpers.lm_batch(3, BATCH, LENGTH, VOCAB))
  full, _, _ = partitioner.sharded_init(lambda r: model.init(r, batch)['params'],
                                        jax.random.key(0))
  vectors, frozen = peft.split(full, ia3.is_vector)
  before = jax.device_get(frozen)
  sgd = optimizers.Optimizer(optax.sgd(0.5), optimizers.constant_schedule(0.5))

  def state(params):
    return TrainState(step=jax.numpy.int32(0), params=params, opt_state=sgd.tx.init(params))

  with partitioner.context():
    everything, _ = jax.jit(make_train_step(model, sgd))(state(full), batch)
    trained, _ = jax.jit(make_train_step(model, sgd), donate_argnums=(0,))(state(vectors), batch,
                                                                           frozen)
  for name, value in flatten(frozen).items():  # not donated, not changed
    assert not value.is_deleted()
    np.testing.assert_array_equal(value, flatten(before)[name], err_msg=name)
  reference, moved_base = peft.split(everything.params, ia3.is_vector)
  assert set(flatten(trained.params)) == set(flatten(reference))
  for name, value in flatten(trained.params).items():
    np.testing.assert_allclose(value, flatten(reference)[name], rtol=1e-6, atol=1e-7,
                               err_msg=name)
  assert max(float(np.abs(v - 1).max()) for v in jax.tree.leaves(trained.params)) > 1e-3
  # Had the base trained, it would have moved: its bit-identity above is the split's doing.
  assert any(not np.array_equal(v, flatten(before)[k]) for k, v in flatten(moved_base).items())


def test_checkpoints_hold_only_the_vectors_and_name_the_base(runs):
  step_dir = runs['run'] / 'checkpoints' / '4'
  meta = _meta(step_dir)
  names = {k.split('/', 1)[1]: v['shape'] for k, v in meta['arrays'].items()
           if k.startswith('params/')}
  batch = helpers.lm_batch(0, BATCH, LENGTH, VOCAB)
  model_vectors = {k: list(v.shape) for k, v in flatten(jax.eval_shape(
      lambda: helpers.init_params(_model(), batch))).items() if ia3.is_vector(k)}
  assert names == model_vectors
  # The optimizer state is Adafactor's for vectors: their shapes, scalars and (1,) placeholders.
  opt_shapes = {tuple(v['shape']) for k, v in meta['arrays'].items() if k.startswith('opt_state/')}
  assert opt_shapes <= {tuple(s) for s in names.values()} | {(), (1,)}
  assert sorted(meta['items']) == ['dataset', 'opt_state', 'params']
  base = meta[peft.META_KEY]['base_checkpoint']
  assert base['resolved'] == str(runs['base'] / 'checkpoints' / '0') and base['step'] == 0
  assert base['format'] == 'efficientlm'
  assert _digests(runs['base']) == runs['base_digests']  # the base was only read


def test_resume_equals_an_uninterrupted_run_and_keeps_its_base(runs, tmp_path):
  resumed = tmp_path / 'resumed'
  shutil.copytree(runs['run'], resumed)
  shutil.rmtree(resumed / 'checkpoints' / '4')  # as if stopped after step 2
  listing = _digests(resumed)
  with pytest.raises(ConfigError) as info:
    _train(resumed, 4, base_checkpoint=str(runs['other']))
  message = str(info.value)
  assert str(runs['base'] / 'checkpoints' / '0') in message
  assert str(runs['other'] / 'checkpoints' / '0') in message
  assert 'BASE_CHECKPOINT' in message and 'new MODEL_DIR' in message
  assert _digests(resumed) == listing  # nothing written
  _train(resumed, 4)  # BASE_CHECKPOINT unset: the recorded base
  straight, again = (_meta(d / 'checkpoints' / '4')['arrays'] for d in (runs['run'], resumed))
  assert {k: v['checksum'] for k, v in again.items()} == {
      k: v['checksum'] for k, v in straight.items()}


def test_merged_checkpoint_is_the_base_with_the_vectors_folded_in(runs, tmp_path):
  """The run read for its own (IA)3 model is the base checkpoint plus the trained vectors; read for
  the plain model (eval, infer) and written by scripts/merge_ia3.py it is their merge (whose
  logits tests/layers/test_ia3.py compares with the unmerged model's)."""
  merged_dir = ia3_checkpoint.write_merged(str(runs['run']), str(tmp_path / 'merged'), _model())
  _, unmerged = tiny_run.latest_params(runs['run'], for_model=_model())
  vectors, rest = peft.split(unmerged, ia3.is_vector)
  jax.tree.map(np.testing.assert_array_equal, rest, runs['base_values'])
  assert max(float(np.abs(v - 1).max()) for v in jax.tree.leaves(vectors)) > 1e-3  # trained
  _, merged = tiny_run.latest_params(merged_dir, for_model=_model(False))
  _, on_the_fly = tiny_run.latest_params(runs['run'], for_model=_model(False))
  jax.tree.map(np.testing.assert_array_equal, on_the_fly, merged)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), merged,
               ia3.merge(jax.device_get(unmerged)))
  assert _meta(merged_dir / 'checkpoints' / '4')['kind'] == 'parameters'
  assert _digests(runs['base']) == runs['base_digests']


def test_a_base_of_other_shapes_stops_with_both_checkpoints_named(runs, tmp_path):
  wide, _ = _write_base(tmp_path / 'wide', _model(False, mlp_dim=64), seed=3)
  wide_digests = _digests(wide)
  with pytest.raises(ConfigError) as info:  # merging the run's vectors into it
    ia3_checkpoint.write_merged(str(runs['run']), str(tmp_path / 'out'), _model(mlp_dim=64),
                                base_path=str(wide))
  message = str(info.value)
  assert str(runs['run'] / 'checkpoints' / '4') in message and str(wide) in message
  assert 'ia3_scale' in message and 'base they were trained on' in message
  assert not (tmp_path / 'out').exists()
  with pytest.raises(ConfigError, match='(?s)does not fit this \\(IA\\)3 model.*model gin'):
    _train(tmp_path / 'new_run', 2, base_checkpoint=str(wide))  # a model of the old shapes
  assert _digests(wide) == wide_digests
  assert _digests(runs['base']) == runs['base_digests']


@pytest.mark.parametrize('with_ia3,base,restore,message', [
    (False, '/b', None, 'set TransformerConfig.ia3 = True'),
    (True, '/b', '/r', 'set RESTORE_PATH = None'),
])
def test_settings_that_do_not_go_together_are_named(with_ia3, base, restore, message):
  with pytest.raises(ConfigError, match=message):
    peft.FrozenBase.for_run(_model(with_ia3), base, restore)
