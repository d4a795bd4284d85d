"""--dry-run prints the exact gcloud command lines of a job, and runs nothing."""

from __future__ import annotations

import io
import shlex
import subprocess

import pytest

from efficientlm.launch import checkout, gcloud, jobs, worker
from efficientlm.launch.runner import Runner, render

ROOT = checkout.REPO_ROOT

INSTALL = (
    "--command='set -e && rm -rf ~/efficientlm && mkdir -p ~/efficientlm && "
    'tar -xzf ~/efficientlm.tar.gz -C ~/efficientlm && '
    'python3 -m pip install --user --quiet --upgrade uv && '
    '~/.local/bin/uv venv --allow-existing --python 3.11 ~/efficientlm-venv && cd ~/efficientlm && '
    '~/.local/bin/uv pip install --python ~/efficientlm-venv/bin/python -c constraints.txt '
    '-e ".[data,tpu]" && '
    '~/efficientlm-venv/bin/python -c "import jax, efficientlm; print(jax.__version__)"\'')


def _start(name: str, main_flags: str) -> str:
  return (f"--command='mkdir -p ~/efficientlm-logs && cd ~/efficientlm && "
          f'{{ nohup ~/efficientlm-venv/bin/python -m efficientlm.main {main_flags} '
          f'> ~/efficientlm-logs/{name}.log 2>&1 < /dev/null & '
          f"echo $! > ~/efficientlm-logs/{name}.pid; }}'")


def test_v4_32_up(dry_run):
  status, lines = dry_run(
      'up', '--name=t5-large', '--zone=us-central2-b', '--accelerator-type=v4-32', '--spot',
      '--gin_file=runs/tpu_pretrain_t5_1_1.gin', '--model-dir=gs://my-bucket/t5_1_1_large',
      '--gin.TRAIN_STEPS=200000')
  assert status == 0
  tpu_vm = 'gcloud compute tpus tpu-vm'
  archive = f'{ROOT}/build/efficientlm-t5-large.tar.gz'
  assert lines == [
      "# preflight ok: mesh {'fsdp': 16} on v4-32 (16 chips, 4 host(s), 16 JAX devices per "
      'slice); global batch 2048 = 128 per data shard x 16 shards, 512 per host x 4 hosts',
      f'{tpu_vm} create t5-large --zone=us-central2-b --accelerator-type=v4-32 '
      '--version=tpu-ubuntu2204-base --spot',
      f'# pack the checkout {ROOT} (git ls-files: tracked and untracked, not ignored) into '
      f'{archive}',
      f'{tpu_vm} scp {archive} t5-large:efficientlm.tar.gz --zone=us-central2-b --worker=all',
      f'{tpu_vm} ssh t5-large --zone=us-central2-b --worker=all {INSTALL}',
      f'{tpu_vm} ssh t5-large --zone=us-central2-b --worker=all ' + _start(
          't5-large', '--gin_file=runs/tpu_pretrain_t5_1_1.gin '
          '--gin.MODEL_DIR=\\"gs://my-bucket/t5_1_1_large\\" --gin.TRAIN_STEPS=200000 '
          '--run_mode=train --distributed'),
      "# following host 0's log ~/efficientlm-logs/t5-large.log; Ctrl-C stops following, not "
      'the run',
      f"{tpu_vm} ssh t5-large --zone=us-central2-b --worker=0 "
      "--command='tail -n +1 -F ~/efficientlm-logs/t5-large.log'",
  ]


def test_v5p_128_queued_up(dry_run):
  status, lines = dry_run(
      'up', '--name=switch-base', '--zone=us-east5-a', '--project=my-project',
      '--accelerator-type=v5p-128', '--queued', '--spot', '--poll-seconds=60',
      '--gin_file=runs/tpu_pretrain_switch.gin', '--model-dir=gs://my-bucket/switch_base_128')
  assert status == 0
  where = '--zone=us-east5-a --project=my-project'
  tpu_vm = 'gcloud compute tpus tpu-vm'
  archive = f'{ROOT}/build/efficientlm-switch-base.tar.gz'
  assert lines == [
      "# preflight ok: mesh {'data': 1, 'expert': 64} on v5p-128 (64 chips, 16 host(s), 64 JAX "
      'devices per slice); global batch 512 = 8 per data shard x 64 shards, 32 per host x 16 '
      'hosts',
      f'gcloud compute tpus queued-resources create switch-base {where} '
      '--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --node-id=switch-base --spot',
      '# waiting until queued resource switch-base is ACTIVE, polling every 60 s',
      f"gcloud compute tpus queued-resources describe switch-base {where} "
      "--format='value(state.state)'",
      f'# pack the checkout {ROOT} (git ls-files: tracked and untracked, not ignored) into '
      f'{archive}',
      f'{tpu_vm} scp {archive} switch-base:efficientlm.tar.gz {where} --worker=all',
      f'{tpu_vm} ssh switch-base {where} --worker=all {INSTALL}',
      f'{tpu_vm} ssh switch-base {where} --worker=all ' + _start(
          'switch-base', '--gin_file=runs/tpu_pretrain_switch.gin '
          '--gin.MODEL_DIR=\\"gs://my-bucket/switch_base_128\\" --run_mode=train '
          '--distributed'),
      "# following host 0's log ~/efficientlm-logs/switch-base.log; Ctrl-C stops following, "
      'not the run',
      f"{tpu_vm} ssh switch-base {where} --worker=0 "
      "--command='tail -n +1 -F ~/efficientlm-logs/switch-base.log'",
  ]


def test_delete_stop_and_logs(dry_run):
  base = ['--name=t5', '--zone=us-central2-b']
  assert dry_run('delete', *base) == (
      0, ['gcloud compute tpus tpu-vm delete t5 --zone=us-central2-b --quiet'])
  assert dry_run('delete', *base, '--queued') == (
      0, ['gcloud compute tpus queued-resources delete t5 --zone=us-central2-b --force --quiet'])
  status, lines = dry_run('stop', *base)
  assert lines == [
      "gcloud compute tpus tpu-vm ssh t5 --zone=us-central2-b --worker=all --command='if [ -f "
      '~/efficientlm-logs/t5.pid ]; then kill "$(cat ~/efficientlm-logs/t5.pid)" || true; '
      "rm -f ~/efficientlm-logs/t5.pid; fi'"]


def test_multislice_commands(dry_run):
  """Two v5p-128 slices in one queued resource: nodes ms-0 and ms-1, ssh across all nodes."""
  base = ['--name=ms', '--zone=us-east5-a', '--queued', '--num-slices=2']
  status, lines = dry_run('create', *base, '--accelerator-type=v5p-128')
  assert status == 0
  assert lines[0] == ('gcloud compute tpus queued-resources create ms --zone=us-east5-a '
                      '--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 '
                      '--node-count=2 --node-prefix=ms')
  status, lines = dry_run('install', *base)
  archive = f'{ROOT}/build/efficientlm-ms.tar.gz'
  assert lines[1:] == [
      f'gcloud compute tpus tpu-vm scp {archive} ms-0:efficientlm.tar.gz --zone=us-east5-a '
      '--worker=all',
      f'gcloud compute tpus tpu-vm scp {archive} ms-1:efficientlm.tar.gz --zone=us-east5-a '
      '--worker=all',
      f'gcloud compute tpus queued-resources ssh ms --zone=us-east5-a --node=all --worker=all '
      f'{INSTALL}']
  status, lines = dry_run('logs', *base)
  assert lines[1] == ('gcloud compute tpus queued-resources ssh ms --zone=us-east5-a --node=0 '
                      "--worker=0 --command='tail -n +1 -F ~/efficientlm-logs/ms.log'")


def test_multislice_run(dry_run):
  status, lines = dry_run(
      'run', '--name=ms', '--zone=us-east5-a', '--queued', '--num-slices=2',
      '--accelerator-type=v5p-128', '--gin_file=runs/tpu_pretrain_switch.gin',
      '--model-dir=gs://b/ms', '--gin.partitioning.Partitioner.dcn_mesh_shape=(2, 1)')
  assert status == 0
  assert "mesh {'data': 2, 'expert': 64} on 2 x v5p-128" in lines[0]
  assert lines[1].startswith('gcloud compute tpus queued-resources ssh ms --zone=us-east5-a '
                             '--node=all --worker=all --command=')
  assert '--run_mode=train --distributed >' in lines[1]


def test_single_host_run_is_not_distributed(dry_run):
  """One host (v4-8: 4 chips) runs one process: no jax.distributed cluster to join."""
  status, lines = dry_run('run', '--name=small', '--zone=us-central2-b', '--accelerator-type=v4-8',
                          '--gin_file=runs/tpu_pretrain_t5_1_1.gin', '--model-dir=/tmp/small',
                          '--gin.BATCH_SIZE=64', '--gin.NUM_MICROBATCHES=1')
  assert status == 0
  assert '1 host(s)' in lines[0]
  assert '--run_mode=train >' in lines[1] and '--distributed' not in lines[1]


def test_multislice_needs_queued(dry_run, capsys):
  status, lines = dry_run('create', '--name=ms', '--zone=z', '--num-slices=2',
                          '--accelerator-type=v5p-128')
  assert (status, lines) == (2, [])
  assert '--num-slices 2 needs --queued' in capsys.readouterr().err


def test_runtime_version_override(dry_run):
  status, lines = dry_run('create', '--name=e', '--zone=us-west4-a',
                          '--accelerator-type=v5litepod-64', '--runtime-version=custom-1')
  assert lines == ['gcloud compute tpus tpu-vm create e --zone=us-west4-a '
                   '--accelerator-type=v5litepod-64 --version=custom-1']


def test_dry_run_runs_nothing(dry_run, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f'dry run executed {args}')

  for name in ('run', 'Popen', 'call', 'check_call', 'check_output'):
    monkeypatch.setattr(subprocess, name, refuse)
  for subcommand in ('up', 'create', 'install', 'run', 'logs', 'stop', 'delete'):
    for queued in ([], ['--queued']):
      status, lines = dry_run(subcommand, '--name=t', '--zone=us-central2-b', *queued,
                              '--accelerator-type=v4-32', '--model-dir=gs://b/t',
                              '--gin_file=runs/tpu_pretrain_t5_1_1.gin')
      assert status == 0 and lines
  assert not (ROOT / 'build' / 'efficientlm-t.tar.gz').exists()


def test_commands_are_shell_quoted():
  """What is printed splits back into the argv that would run, and the worker's shell sees the
  gin override as one word."""
  target = gcloud.Target('t', 'us-central2-b')
  main = worker.main_argv(['runs/x.gin'], ['MODEL_DIR="gs://b/a b"', "NAME='it''s'"])
  argv = gcloud.ssh(target, worker.start('t', main))
  assert shlex.split(render(argv)) == argv
  remote = shlex.split(argv[-1][len('--command='):])
  assert '--gin.MODEL_DIR="gs://b/a b"' in remote
  assert "--gin.NAME='it''s'" in remote


def test_wait_until_active_polls(monkeypatch):
  states = iter(['WAITING_FOR_RESOURCES', 'PROVISIONING', 'ACTIVE'])
  runner = Runner(dry_run=False, out=io.StringIO())
  calls = []
  monkeypatch.setattr(runner, 'output', lambda argv, dry_run_result='': calls.append(argv) or
                      next(states))
  monkeypatch.setattr(runner, 'sleep', lambda s: None)
  job = jobs.Job(gcloud.Target('q', 'z', queued=True))
  jobs.wait_until_active(job, runner)
  assert len(calls) == 3
  assert any('PROVISIONING' in line for line in runner.lines)
  failing = iter(['FAILED'])
  monkeypatch.setattr(runner, 'output', lambda argv, dry_run_result='': next(failing))
  with pytest.raises(RuntimeError, match='Queued resource q is FAILED'):
    jobs.wait_until_active(job, runner)
