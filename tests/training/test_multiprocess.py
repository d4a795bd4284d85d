"""Two processes on this machine (jax.distributed over localhost, 4 CPU devices each) against
one process with all 8: the same global batches must give the same parameters, and a SIGTERM to
both mid-run must resume without a step lost or repeated."""

from __future__ import annotations

import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from efficientlm.training import checkpoints
from tests.training import multiprocess_run
from tests.training import tiny_run

pytestmark = pytest.mark.slow  # every test here runs for 10 s or more

ROOT = pathlib.Path(__file__).parents[2]
STEPS = 12
# The processes reduce gradients over gloo, one process inside XLA: summation order differs.
TOLERANCE = dict(rtol=2e-5, atol=2e-6)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(model_dir, steps, delay=0.0, *extra):
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, '-m', 'tests.training.multiprocess_run', str(model_dir), str(steps),
       str(delay), str(i), '2', str(port), *extra],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]


def _finish(procs, timeout=240) -> list[str]:
  try:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    tails = [f'--- process {i} ---\n{p.communicate()[0][-6000:]}' for i, p in enumerate(procs)]
    pytest.fail(f'the run did not finish in {timeout} s (stacks dumped after '
                f'{multiprocess_run.STACKS_AFTER_S} s):\n' + '\n'.join(tails))
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


@pytest.fixture(scope='module')
def single_process(tmp_path_factory):
  """The reference: the same run in this one process over all 8 devices."""
  directory = tmp_path_factory.mktemp('single')
  tiny_run.train(directory, STEPS)
  return tiny_run.latest_params(directory)


def _assert_same_params(directory, reference):
  step, params = tiny_run.latest_params(directory)
  assert step == reference[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE), params, reference[1])


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  """The same run as two processes, each process's devices a slice of one hybrid (ICI x DCN)
  mesh: (directory, outputs). The other tests launch with one mesh over all 8 devices and end
  with the same comparison against `single_process`."""
  directory = tmp_path_factory.mktemp('two_processes')
  return directory, _finish(_launch(directory, STEPS, 0.0, 'hybrid'))


def test_two_processes_train_like_one(single_process, two_processes):
  directory, outputs = two_processes
  assert f'step {STEPS}:' in outputs[0]
  assert 'step ' not in outputs[1]  # logs and metrics come from process 0 only
  _assert_same_params(directory, single_process)


# A preemption signals every VM; here only process 1 (which logs nothing) is signalled, the
# harder case: the preemption sync point must still stop both at one step (a per-process flag
# would not), and what stops both when one is signalled stops them when both are.
def test_sigterm_stops_every_process_at_one_step_and_the_relaunch_resumes(tmp_path,
                                                                         single_process):
  # Step 4 waits for `release`, so the signal lands while the run is held there, not whenever
  # this process gets to read 'step 3:' (a race with a run that goes on); the steps after it
  # are slow, which leaves the preemption notice time to reach the other process.
  release = tmp_path / 'release'
  procs = _launch(tmp_path, STEPS, 0.3, f'hold=3:{release}')
  for line in procs[0].stdout:
    if line.startswith('step 3:'):
      break
  procs[1].send_signal(signal.SIGTERM)
  release.touch()
  outputs = _finish(procs)
  stopped = re.search(r'SIGTERM: saved checkpoint (\d+) and stopped', outputs[0])
  assert stopped, outputs[0][-3000:]
  stopped = int(stopped.group(1))
  assert 4 <= stopped < STEPS
  assert checkpoints.Checkpointer(tmp_path / 'checkpoints').steps()[-1] == stopped
  # Both processes saved their data position at that step: the relaunch continues from it.
  for i in (0, 1):
    assert list((tmp_path / 'checkpoints').glob(f'{stopped}/**/process_{i}')), i

  outputs = _finish(_launch(tmp_path, STEPS))
  assert f'step {stopped + 1}:' in outputs[0] and f'step {stopped}:' not in outputs[0]
  # A lost or repeated batch would change the parameters.
  _assert_same_params(tmp_path, single_process)


def test_hard_kill_of_both_resumes_from_the_last_checkpoint(tmp_path, single_process):
  """SIGKILL (no chance to save) after step 11: the relaunch restarts from the last checkpoint
  (written every 10 steps), replays the batches after it from the saved data position, and ends
  where an uninterrupted run does."""
  # Step 12 waits for a file nobody writes: the kill lands after step 11 and before the final
  # save however late this process reads 'step 11:'.
  procs = _launch(tmp_path, STEPS, 0.0, f'hold={STEPS - 1}:{tmp_path / "never"}')
  for line in procs[0].stdout:
    if line.startswith('step 11:'):
      break
  # Checkpoint 10 is saved asynchronously: kill once it is committed (orbax renames its
  # directory to the step last), not after a guess at how long saving takes.
  deadline = time.monotonic() + 240
  while not (tmp_path / 'checkpoints' / '10').is_dir():
    assert time.monotonic() < deadline, 'checkpoint 10 was never committed'
    time.sleep(0.1)
  for p in procs:
    p.kill()
    p.communicate(timeout=60)
  saved = checkpoints.Checkpointer(tmp_path / 'checkpoints').steps()
  assert saved and saved[-1] < STEPS, saved  # killed before the final save
  outputs = _finish(_launch(tmp_path, STEPS))
  assert f'checkpoints/{saved[-1]}' in outputs[0]  # "resumed from .../checkpoints/N"
  assert f'step {saved[-1] + 1}:' in outputs[0] and f'step {saved[-1]}:' not in outputs[0]
  _assert_same_params(tmp_path, single_process)


def test_damage_only_one_process_sees_is_everyones(tmp_path, single_process, two_processes):
  """Each process reads its own data position (and shards): when only process 1 finds the newest
  checkpoint damaged, both must move it aside and fall back together. (A process that raised
  inside Orbax's restore skipped its closing barrier, and the others' barrier paired with its
  next collective: the relaunch hung.)"""
  shutil.copytree(two_processes[0], tmp_path, dirs_exist_ok=True)
  (tmp_path / 'RUN_LOCK').unlink(missing_ok=True)
  steps = checkpoints.Checkpointer(tmp_path / 'checkpoints').steps()
  assert steps[-2:] == [10, STEPS], steps
  position = max((p for p in (tmp_path / 'checkpoints' / str(STEPS)).glob('**/process_1/*')
                  if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(position.read_bytes())
  data[len(data) // 2] ^= 0xFF
  position.write_bytes(bytes(data))

  outputs = _finish(_launch(tmp_path, STEPS, 0.0, 'hybrid'))
  assert f'process 1: reading checkpoint {tmp_path / "checkpoints" / str(STEPS)} failed' in (
      outputs[1]), outputs[1][-3000:]
  assert 'does not match its checksum' in outputs[1]
  assert 'process(es) [1] found it damaged' in outputs[0], outputs[0][-3000:]
  assert 'Falling back to step 10.' in outputs[0]
  assert 'step 11:' in outputs[0]
  assert (tmp_path / 'checkpoints' / f'{STEPS}{checkpoints.UNREADABLE_SUFFIX}').is_dir()
  _assert_same_params(tmp_path, single_process)
