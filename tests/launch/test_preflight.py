"""Preflight: a config that cannot run on the slice stops before any gcloud command."""

from __future__ import annotations

import io
import subprocess

import pytest

from efficientlm import partitioning
from efficientlm.launch import preflight, tpu_slices
from efficientlm.launch.preflight import MeshConfig, PreflightError
from efficientlm.launch.runner import Runner

V4_32 = tpu_slices.parse_accelerator_type('v4-32')  # 16 devices, 4 hosts
V5P_128 = tpu_slices.parse_accelerator_type('v5p-128')  # 64 devices, 16 hosts
T5 = ['runs/tpu_pretrain_t5_1_1.gin']
GS = ["MODEL_DIR = 'gs://b/run'"]


def test_shipped_gins_fit_their_slices():
  plan = preflight.check(T5, GS, V4_32)
  assert (plan.mesh, plan.data_shards, plan.processes) == ({'fsdp': 16}, 16, 4)
  plan = preflight.check(['runs/tpu_pretrain_switch.gin'], GS, V5P_128)
  assert (plan.mesh, plan.data_shards, plan.processes) == ({'data': 1, 'expert': 64}, 64, 16)


def test_mesh_that_does_not_match_the_device_count():
  with pytest.raises(PreflightError, match=r'mesh_shape \(one slice\) \(8, 4\) needs 32 devices '
                     r'but there are 16\. A v4-32 slice has 16 JAX devices \(16 chips\)'):
    preflight.check(['models/t5_1_1/base.gin', 'runs/pretrain.gin', 'meshes/2d.gin'],
                    GS + ['partitioning.Partitioner.mesh_shape = (8, 4)'], V4_32)
  with pytest.raises(PreflightError, match=r'\(-1, 3\) cannot use 16 devices: 16 is not '
                     'divisible by 3'):
    preflight.check(T5, GS + ['partitioning.Partitioner.mesh_shape = (-1, 3)',
                              "partitioning.Partitioner.axis_names = ('fsdp', 'model')"], V4_32)


def test_global_batch_not_divisible_by_data_parallel_size():
  with pytest.raises(PreflightError, match=r'BATCH_SIZE=1000 is not divisible by the '
                     r"data-parallel size 16 \(mesh \{'fsdp': 16\}.*multiple of 16, e\.g\. 1008"):
    preflight.check(T5, GS + ['BATCH_SIZE = 1000', 'NUM_MICROBATCHES = 1'], V4_32)


def test_model_axis_does_not_split_the_batch():
  """2D mesh on 16 devices: fsdp 4 x model 4, so batch 12 splits over the 4 data shards."""
  plan = preflight.check(['models/t5_1_1/base.gin', 'runs/pretrain.gin', 'meshes/2d.gin'],
                         GS + ['BATCH_SIZE = 12'], V4_32)
  assert (plan.mesh, plan.data_shards) == ({'fsdp': 4, 'model': 4}, 4)


def test_expert_axis_splits_the_batch():
  assert partitioning.data_shards({'data': 2, 'expert': 4, 'model': 2}, 'expert_tensor_parallel') == 8


def test_per_host_batch():
  """fsdp 1 x model 16: one data shard, but each of the 4 hosts loads a quarter of the batch."""
  mesh = MeshConfig((1, -1), ('fsdp', 'model'), '2d')
  with pytest.raises(PreflightError, match=r'BATCH_SIZE=6 does not split over the 4 hosts'):
    preflight.plan(mesh, V4_32, 1, global_batch=6)


def test_parameters_must_split_over_the_mesh():
  """Switch-Base's 128 experts cannot split 256 ways (a v5p-512 slice)."""
  with pytest.raises(PreflightError, match=r"expert.*size 128\) is not divisible by mesh axes "
                     r"\('expert',\) of total size 256"):
    preflight.check(['runs/tpu_pretrain_switch.gin'], GS,
                    tpu_slices.parse_accelerator_type('v5p-512'))


def test_multislice_mesh():
  mesh = MeshConfig((1, -1), ('data', 'expert'), 'expert_parallel', dcn_mesh_shape=(2, 1))
  plan = preflight.plan(mesh, V5P_128, 2, global_batch=512)
  assert (plan.mesh, plan.ici_mesh) == ({'data': 2, 'expert': 64}, {'data': 1, 'expert': 64})
  assert (plan.data_shards, plan.processes) == (128, 32)
  with pytest.raises(PreflightError, match='dcn_mesh_shape is not set'):
    preflight.plan(MeshConfig((-1,), ('fsdp',)), V5P_128, 2, global_batch=512)
  with pytest.raises(PreflightError, match=r'dcn_mesh_shape \(across slices\) \(4, 1\) needs 4 '
                     r'devices but there are 2\. Its product must be the number of slices'):
    preflight.plan(MeshConfig((1, -1), ('data', 'expert'), dcn_mesh_shape=(4, 1)), V5P_128, 2,
                   global_batch=512)


def test_model_dir_must_be_shared_on_multi_host_slices():
  with pytest.raises(PreflightError, match="MODEL_DIR '/tmp/run' is not on Cloud Storage"):
    preflight.check(T5, ["MODEL_DIR = '/tmp/run'"], V4_32)
  with pytest.raises(PreflightError, match='MODEL_DIR is not set'):
    preflight.check(T5, [], V4_32)


class _Refusing(Runner):
  """A runner that fails the test if any command is run or printed."""

  def run(self, argv):
    raise AssertionError(f'ran {argv}')

  def output(self, argv, dry_run_result=''):
    raise AssertionError(f'ran {argv}')

  def local(self, description, fn):
    raise AssertionError(description)


@pytest.mark.parametrize('subcommand', ['up', 'run'])
@pytest.mark.parametrize('bad', [['--gin.BATCH_SIZE=1000', '--gin.NUM_MICROBATCHES=1'],
                                 ['--gin.partitioning.Partitioner.mesh_shape=(8,)']])
def test_bad_config_stops_before_any_command(launch_tpu, monkeypatch, capsys, subcommand, bad):
  monkeypatch.setattr(subprocess, 'run', lambda *a, **k: pytest.fail('subprocess.run called'))
  runner = _Refusing(dry_run=False, out=io.StringIO())
  status = launch_tpu.main([subcommand, '--name=t5', '--zone=us-central2-b',
                            '--accelerator-type=v4-32', '--gin_file=runs/tpu_pretrain_t5_1_1.gin',
                            '--model-dir=gs://b/t5', *bad], runner=runner)
  assert status == 2 and runner.lines == []
  err = capsys.readouterr().err
  assert 'preflight failed, nothing was started' in err
  assert ('data-parallel size 16' in err) or ('needs 8 devices but there are 16' in err)


@pytest.mark.parametrize('rules', sorted(partitioning.RULE_PRESETS))
@pytest.mark.parametrize('shape,axes', [((2, 4), ('data', 'model')), ((2, 2, 2),
                                        ('data', 'expert', 'model')), ((4, 2), ('fsdp', 'model')),
                                        ((8,), ('expert',))])
def test_data_shards_agree_with_the_partitioner(rules, shape, axes):
  """The batch split the preflight computes from axis sizes alone (gin, no devices) equals the
  real Partitioner's on a mesh of the 8 emulated devices."""
  real = partitioning.Partitioner(shape, axes, rules).data_shards()
  assert partitioning.data_shards(dict(zip(axes, shape)), rules) == real
