"""Ctrl-C stops the test suite as `make test` runs it (pytest-xdist workers, this conftest, JAX
and training in the workers) and prints the usual summary. The terminal sends SIGINT to the
whole foreground process group; so does this test."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).parents[1]
TRAINER_TESTS = 'tests/training/test_trainer.py::test_'
# In this order: a test that is over at once (its result says the worker is up and has imported
# JAX), then training runs: the Ctrl-C arrives two seconds into the first of them, with the next
# still to come (test_trainer.py's first test took 5 s to get there, and is not needed).
SUITE = [TRAINER_TESTS + name for name in (
    'missing_restore_path_is_named', 'resume_equals_an_uninterrupted_run',
    'restore_onto_a_smaller_mesh')]


def test_ctrl_c_stops_the_suite_with_a_summary():
  # The child inherits an ignored SIGINT (SIG_IGN survives exec, a handler does not; Python
  # keeps it ignored) and a blocked one (the signal mask survives exec): a worker in either
  # state when this runs would start a suite deaf to Ctrl-C (seen twice in full-suite runs: the
  # worker stopped its training run, the suite went on). A terminal's foreground job has
  # neither; give the child that.
  inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
  blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
  try:
    suite = subprocess.Popen(
        [sys.executable, '-m', 'pytest', '-n', '1', '-q', '-p', 'no:cacheprovider', *SUITE],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    signal.signal(signal.SIGINT, inherited)
  output = []
  try:
    while True:  # until the first test result: workers are up and busy with JAX
      char = suite.stdout.read(1)
      assert char, ''.join(output)
      output.append(char)
      if re.search(r'nodes\.\.\.\n+[.Fs]', ''.join(output[-200:])):
        break
    time.sleep(2)
    os.killpg(suite.pid, signal.SIGINT)
    rest, _ = suite.communicate(timeout=180)
  finally:
    if suite.poll() is None:
      os.killpg(suite.pid, signal.SIGKILL)
  text = ''.join(output) + rest
  assert suite.returncode == 2, (inherited, blocked, text[-3000:])  # pytest's "interrupted"
  assert 'KeyboardInterrupt' in text and ' passed' in text.splitlines()[-1], text[-3000:]
