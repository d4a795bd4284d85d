"""What a newcomer sees on a CPU machine: `make train`'s job names every start-up phase before the
first step, and neither it nor an eval of its checkpoint prints CUDA probes, TensorFlow start-up
notes or library warnings that do not apply (each was fixed at its source)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]
NOISE = ('cuInit', 'cudart', 'CUDA', 'oneDNN', 'absl::InitializeLog', 'cpu_feature_guard',
         'Metadata file does not exist', 'uncached FunctionDataset', 'did not fully read',
         'Traceback')


def _main(*flags):
  # One CPU device, as on a laptop: the suite's XLA flags (tests/conftest.py) less the emulated
  # device count. The flag left, backend optimization level 0, makes the programs compile faster
  # and changes nothing this test checks in what the runs print.
  env = {**os.environ, 'XLA_FLAGS': ' '.join(
      f for f in os.environ.get('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count'))}
  run = subprocess.run([sys.executable, '-m', 'efficientlm.main', *flags], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout, run.stderr


def test_make_train_names_its_phases_and_prints_no_noise(tmp_path):
  out, err = _main('--gin_file=runs/recall_tiny.gin', f"--gin.MODEL_DIR='{tmp_path}'",
                   '--gin.TRAIN_STEPS=2', '--gin.WARMUP_STEPS=1', '--gin.LOG_EVERY=1',
                   '--gin.CHECKPOINT_EVERY=2', '--gin.EVAL_EVERY=2', '--gin.MAX_EVAL_BATCHES=1')
  lines = out.splitlines()
  first_step = next(i for i, line in enumerate(lines) if line.startswith('step 1:'))
  phases = ['building the data pipeline', 'tracing the model and optimizer state',
            'initializing 0.75M parameters', 'compiling the train step']
  for phase in phases:  # each announced, then timed, before the first step
    start = lines.index(f'{phase} ...')
    end = next(i for i, line in enumerate(lines) if line.startswith(f'{phase}: '))
    assert start < end < first_step and lines[end].endswith(' s'), out
  assert all(len(line) <= 100 for line in lines), out
  assert not [n for n in NOISE if n in err + out], err

  _, err = _main('--run_mode=eval', '--gin_file=models/switch/decoder_tiny.gin',
                 '--gin_file=runs/eval.gin', f"--gin.MODEL_DIR='{tmp_path / 'eval'}'",
                 f"--gin.CHECKPOINT_PATH='{tmp_path}'", '--gin.VOCAB_SIZE=64',
                 "--gin.ACTIVATION_DTYPE='float32'",
                 "--gin.MIXTURE_OR_TASK_NAME='synthetic_recall'",
                 "--gin.TASK_FEATURE_LENGTHS={'targets': 98}", '--gin.BATCH_SIZE=32',
                 '--gin.MAX_EVAL_BATCHES=1')
  assert not [n for n in NOISE if n in err], err
