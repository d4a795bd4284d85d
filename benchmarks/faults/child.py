"""The training job as a subprocess: `python -m efficientlm.main` on runs/recall_tiny.gin, with its
stdout read line by line (timestamped, by a thread) so kills can be timed by the lines it prints."""

from __future__ import annotations

import os
import pathlib
import queue
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT = object()  # next_line: nothing arrived in time
EOF_ = object()  # next_line: the child closed its stdout


def command(model_dir: pathlib.Path, steps: int, checkpoint_every: int, keep: int | None,
            extra_bindings=()) -> list[str]:
  """The `make train` job, shortened: a progress line every step (kills are timed by them), no
  periodic eval (one batch at the end), warmup a tenth of the steps."""
  return [sys.executable, '-m', 'efficientlm.main', '--gin_file=runs/recall_tiny.gin',
          f"--gin.MODEL_DIR='{model_dir}'", f'--gin.TRAIN_STEPS={steps}',
          f'--gin.WARMUP_STEPS={max(1, steps // 10)}',
          f'--gin.CHECKPOINT_EVERY={checkpoint_every}', f'--gin.KEEP_CHECKPOINTS={keep}',
          '--gin.LOG_EVERY=1', '--gin.EVAL_EVERY=None', '--gin.MAX_EVAL_BATCHES=1',
          *(f'--gin_bindings={b}' for b in extra_bindings)]


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
  """The child's environment: as given (default: ours), unbuffered, TensorFlow's logs quiet."""
  env = dict(os.environ if base is None else base)
  env.update(PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL='2')
  return env


class Child:
  """One run. stdout lines go to a queue (and `log_path`), stderr to `log_path`.stderr."""

  def __init__(self, argv: list[str], log_path: pathlib.Path, env: dict[str, str]):
    self.started = time.monotonic()
    self._log = open(log_path, 'w', encoding='utf-8')  # pylint: disable=consider-using-with
    self._err = open(log_path.with_suffix('.stderr'), 'w',  # pylint: disable=consider-using-with
                     encoding='utf-8')
    self.stderr_path = log_path.with_suffix('.stderr')
    self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=self._err, text=True, bufsize=1)
    self._lines: queue.Queue = queue.Queue()
    self._pump = threading.Thread(target=self._read, daemon=True)
    self._pump.start()

  def _read(self):
    for line in self.proc.stdout:
      self._log.write(line)
      self._log.flush()
      self._lines.put((time.monotonic() - self.started, line.rstrip('\n')))
    self._lines.put(EOF_)

  def next_line(self, timeout: float | None):
    """(seconds since start, line), TIMEOUT or EOF_."""
    try:
      return self._lines.get(timeout=timeout)
    except queue.Empty:
      return TIMEOUT

  def signal(self, signum: int) -> float:
    """Sends `signum` to the child alone; returns when (seconds since start)."""
    self.proc.send_signal(signum)
    return time.monotonic() - self.started

  def finish(self, timeout: float) -> int:
    """Waits for the child to end (killing it past `timeout`); its exit status."""
    try:
      rc = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      rc = self.proc.wait()
    self._pump.join(timeout=10)
    self._log.close()
    self._err.close()
    return rc

  def stderr_tail(self, lines: int = 15) -> str:
    text = self.stderr_path.read_text(encoding='utf-8', errors='replace').splitlines()
    return '\n'.join(l for l in text[-lines:])
