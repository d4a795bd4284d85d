"""Ctrl-C in training behaves like SIGTERM (save the current step, exit 0, say how to resume); a
second Ctrl-C stops at once without saving. Real signals to a real training process."""

from __future__ import annotations

import re
import signal
import time

from efficientlm.training import checkpoints
from tests.training import tiny_run
from tests.training.test_run_safety import _tiny_run, _wait_for


def test_ctrl_c_saves_the_current_step_and_the_run_resumes(tmp_path, capsys):
  run = _tiny_run(tmp_path, 200, delay=0.05)
  _wait_for(run, 'step 3:')
  run.send_signal(signal.SIGINT)
  out, err = run.communicate(timeout=120)
  assert run.returncode == 0, err
  assert 'Ctrl-C again stops at once' in err
  stopped = int(re.search(r'Ctrl-C: saved checkpoint (\d+) and stopped; run the same command '
                          r'again to resume', out).group(1))
  assert checkpoints.Checkpointer(tmp_path / 'checkpoints').steps() == [stopped]
  # The same run, resumed (in this process: the signals were what needed a process of its own).
  tiny_run.train(tmp_path, stopped + 2, model=tiny_run.wide_model())
  assert f'resumed from {tmp_path}/checkpoints/{stopped}' in capsys.readouterr().out


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
  run = _tiny_run(tmp_path, 200, delay=3.0)  # each batch takes 3 s to arrive
  _wait_for(run, 'step 1:')
  run.send_signal(signal.SIGINT)
  time.sleep(0.5)
  run.send_signal(signal.SIGINT)  # while the next batch is still loading
  out, err = run.communicate(timeout=60)
  assert run.returncode != 0 and 'KeyboardInterrupt' in err
  assert 'step 2:' not in out  # it did not finish the step it was loading, nor save
  assert checkpoints.Checkpointer(tmp_path / 'checkpoints').steps() == []
