"""A run never loses or silently corrupts MODEL_DIR, checked with real faults on real runs: a
changed model, flipped bytes, a second process, a full disk (the file-size limit), SIGTERM during
start-up. Each asserts on what matters: the steps that exist afterwards and their bytes, the exit
status, and that the message names the path and the fix."""

from __future__ import annotations

import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from efficientlm import main
from efficientlm.training import checkpoints
from tests.training import tiny_run
from tests.training.test_checkpoint_integrity import _flip, _largest_file, _snapshot
from tests.test_main import TINY_RUN

ROOT = pathlib.Path(__file__).parents[2]


def _tiny_run(model_dir, steps, delay=0.0, file_size_limit_kib=None):
  """tests.training.tiny_run (the wide model, a progress line per step) in a subprocess; with a
  limit, no file it writes may grow past that size (the shell's ulimit -f: no fork hooks in this
  multithreaded process)."""
  command = [sys.executable, '-m', 'tests.training.tiny_run', str(model_dir), str(steps),
             str(delay), '1']
  if file_size_limit_kib is not None:
    command = ['bash', '-c', f'ulimit -f {file_size_limit_kib} && exec "$@"', 'bash', *command]
  return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _wait_for(proc, prefix) -> list[str]:
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(prefix):
      return lines
  raise AssertionError(f'no line starting with {prefix!r}:\n{"".join(lines)}\n'
                       f'{proc.stderr.read()[-3000:]}')


def _params(model_dir, step):
  _, params = _load(model_dir / 'checkpoints' / str(step))
  return params


def _load(path):
  from efficientlm.checkpoints.load import load_params  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  batch = helpers.lm_batch(0, 8, 8, tiny_run.VOCAB)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  abstract, _ = tiny_run.partitioner().abstract_params(
      tiny_run.wide_model().param_initializer(spec), jax.random.key(0))
  step, params, _ = load_params(str(path), abstract)
  return step, params


@pytest.fixture(scope='module')
def ten_steps(tmp_path_factory):
  """A finished 10-step run of the wide model (checkpoint 10): tests that start from one copy it
  rather than train it again (the run is deterministic: a copy is what training gives)."""
  directory = tmp_path_factory.mktemp('ten_steps')
  tiny_run.train(directory, 10, model=tiny_run.wide_model())
  return directory


def _copy(run, directory):
  shutil.copytree(run, directory, dirs_exist_ok=True)
  return directory


def test_a_changed_model_stops_before_anything_is_written(tmp_path, capsys):
  """The issue's case: a run restarted with another emb_dim used to skip every checkpoint as
  unreadable, train the wrong model, delete the originals and overwrite config.gin."""
  # No eval at the end of the run: what is written is checked, not scores.
  flags = TINY_RUN + [f"--gin.MODEL_DIR='{tmp_path}'", '--gin.trainer.train.eval_dataset=None']
  assert main.run(flags) == 0
  before = _snapshot(tmp_path)
  assert 'checkpoints/4/params/_METADATA' in before and 'config.gin' in before
  capsys.readouterr()
  assert main.run(flags + ['--gin.TransformerConfig.emb_dim=64', '--gin.TRAIN_STEPS=8']) == 1
  err = capsys.readouterr().err
  assert ('params/decoder/decoder_norm/scale: the model has float32[64], the checkpoint '
          'float32[128]') in err, err
  assert f'{tmp_path}/checkpoints/4 was written by a different model configuration' in err
  assert 'new MODEL_DIR' in err and 'RESTORE_PATH' in err and 'Traceback' not in err
  assert _snapshot(tmp_path) == before  # no file added, changed or removed


def test_flipped_bytes_fall_back_rewrite_the_step_and_end_bit_identical(tmp_path, capsys):
  straight, damaged = tmp_path / 'straight', tmp_path / 'damaged'
  tiny_run.train(straight, 20, model=tiny_run.wide_model())
  shutil.copytree(straight, damaged)  # a second copy of the run (training it again: the same)
  data_file = _largest_file(damaged / 'checkpoints' / '20' / 'params')
  _flip(data_file, data_file.stat().st_size // 2)
  flipped = _snapshot(damaged / 'checkpoints' / '20')
  capsys.readouterr()

  log = []
  tiny_run.train(damaged, 20, model=tiny_run.wide_model(), log=log)
  out = capsys.readouterr().out
  assert 'do not match their checksums' in out and 'Falling back to step 10' in out
  assert log == list(range(10, 20))  # retrained from 10 ...
  assert 'saved checkpoint 20' in out  # ... and step 20 written anew, not skipped
  assert _snapshot(damaged / 'checkpoints' / '20.unreadable') == flipped  # kept as it was
  assert checkpoints.Checkpointer(damaged / 'checkpoints').steps() == [10, 20]
  jax.tree.map(np.testing.assert_array_equal, _params(damaged, 20), _params(straight, 20))
  # Later runs (and eval, infer, convert: they read the newest numbered step) see the new one.
  capsys.readouterr()
  tiny_run.train(damaged, 20, model=tiny_run.wide_model())
  assert 'unreadable' not in capsys.readouterr().out


def test_a_fall_back_to_scratch_starts_the_data_from_its_beginning(tmp_path, capsys, ten_steps):
  """Found by benchmarks/fault_injection.py: the damaged step's data position used to be restored
  before its arrays were found damaged, so a run falling back to scratch skipped ahead."""
  damaged = _copy(ten_steps, tmp_path / 'damaged')
  data_file = _largest_file(damaged / 'checkpoints' / '10' / 'params')
  _flip(data_file, data_file.stat().st_size // 2)
  capsys.readouterr()
  log = []
  tiny_run.train(damaged, 10, model=tiny_run.wide_model(), log=log)
  assert 'No older checkpoint: starting from scratch' in capsys.readouterr().out
  assert log == list(range(10))
  jax.tree.map(np.testing.assert_array_equal, _params(damaged, 10), _params(ten_steps, 10))


def test_a_second_process_on_the_same_model_dir_is_refused_at_once(tmp_path):
  first = _tiny_run(tmp_path, 400, delay=0.05)
  try:
    _wait_for(first, 'step 2:')
    second = _tiny_run(tmp_path, 400)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 1, err
    assert f'{tmp_path} is in use by another run' in err
    assert f'pid {first.pid}' in err and '--take_over_lock' in err and 'Traceback' not in err
    first.send_signal(signal.SIGTERM)  # the first run goes on undisturbed, then stops cleanly
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    stopped = int(re.search(r'SIGTERM: saved checkpoint (\d+)', out).group(1))
    assert checkpoints.Checkpointer(tmp_path / 'checkpoints').steps()[-1] == stopped
    assert not (tmp_path / 'RUN_LOCK').exists()  # released on the way out
  finally:
    first.kill()


def test_a_full_disk_stops_at_the_failed_save_with_one_message(tmp_path, capsys, ten_steps):
  # A good checkpoint 10, from the run _tiny_run starts (trained in this process: only the run
  # under the file-size limit needs a process of its own).
  _copy(ten_steps, tmp_path)
  good = _snapshot(tmp_path / 'checkpoints' / '10')
  # No file may grow past 200 kB: the next checkpoint's data files cannot be written.
  run = _tiny_run(tmp_path, 40, file_size_limit_kib=200)
  out, err = run.communicate(timeout=240)
  assert run.returncode == 1, err
  assert 'saved checkpoint 20' not in out and 'saved checkpoint 30' not in out
  message = [line for line in err.splitlines() if line.startswith('efficientlm:')]
  assert len(message) == 1, err
  assert f'Saving checkpoint {tmp_path}/checkpoints/20 failed' in message[0]
  assert 'File too large' in message[0] and 'Free space there' in message[0]
  assert f'The last good checkpoint is {tmp_path}/checkpoints/10' in message[0]
  assert 'Traceback' not in err and len(err.splitlines()) < 20, err
  assert _snapshot(tmp_path / 'checkpoints' / '10') == good
  assert checkpoints.Checkpointer(tmp_path / 'checkpoints').steps() == [10]
  # With space again, the same run (here in this process) resumes from the last good checkpoint.
  capsys.readouterr()
  tiny_run.train(tmp_path, 20, model=tiny_run.wide_model())
  out = capsys.readouterr().out
  assert f'resumed from {tmp_path}/checkpoints/10' in out and 'saved checkpoint 20' in out


@pytest.fixture
def small_filesystem(tmp_path):
  """A 2 MiB tmpfs (root only; skipped where mounts are not allowed)."""
  mount = tmp_path / 'small'
  mount.mkdir()
  made = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(mount)],
                        capture_output=True, text=True, check=False)
  if made.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here: {made.stderr.strip()}')
  try:
    yield mount
  finally:
    subprocess.run(['umount', str(mount)], check=False)


def test_a_really_full_disk_also_ends_with_one_message(small_filesystem):
  """ENOSPC hits everything (TensorBoard events, the gin config), not only the checkpoint: none
  of it may bury the message or replace the exit status."""
  run = _tiny_run(small_filesystem / 'run', 40)
  out, err = run.communicate(timeout=240)
  assert run.returncode == 1, err
  message = [line for line in err.splitlines() if line.startswith('efficientlm:')]
  assert len(message) == 1 and 'No space left on device' in message[0], err
  assert 'The last good checkpoint is ' in message[0]
  # Measured after the failed save, when Orbax may have dropped some of its temporary files:
  # near 0 of the 2 MiB, not always exactly 0.0 (a full-suite run failed on that once).
  free = re.search(r'Free space there: (\d+\.\d) MiB', message[0])
  assert free and float(free.group(1)) < 1.0, message[0]
  assert 'Traceback' not in err and len(err.splitlines()) < 20, err
  assert checkpoints.Checkpointer(small_filesystem / 'run' / 'checkpoints').steps() == [10]


def test_sigterm_during_start_up_exits_cleanly_with_nothing_saved(tmp_path):
  run = _tiny_run(tmp_path, 10, delay=20.0)  # the first batch takes 20 s to arrive
  _wait_for(run, 'DecoderOnly:')  # state built; the loop is waiting for its first batch
  run.send_signal(signal.SIGTERM)
  out, err = run.communicate(timeout=60)
  assert run.returncode == 0, err
  assert 'stopped before the first step, nothing to save' in out
  assert not any((tmp_path / 'checkpoints').iterdir())
  assert not (tmp_path / 'RUN_LOCK').exists()


def test_resuming_with_an_unchanged_model_still_works(tmp_path, ten_steps):
  """The mismatch check is not a false alarm: same model, another mesh, more steps."""
  _copy(ten_steps, tmp_path)
  tiny_run.train(tmp_path, 20, model=tiny_run.wide_model(),
                 partitioner=tiny_run.partitioner(shape=(8,), axes=('fsdp',), rules='fsdp'))
  assert checkpoints.Checkpointer(tmp_path / 'checkpoints').steps() == [10, 20]
