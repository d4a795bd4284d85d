"""`python -m efficientlm.main` plus what the comparison table needs about memory.

  python -m benchmarks.measured_run <the flags of efficientlm.main>

Runs `efficientlm.main.run` with the flags unchanged (same trainer, checkpoints, resume, Ctrl-C
handling, exit status). Then, if it succeeded, writes MODEL_DIR/memory.json:
- step_memory_bytes, step_temp_bytes: XLA's memory analysis of the run's train step, compiled
  again from the run's own gin (MODEL, PARTITIONER, optimizer, BATCH_SIZE,
  TASK_FEATURE_LENGTHS): per device, arguments + outputs - donated + temporaries;
- device_peak_bytes: the device's measured high-water mark over this process (initialization,
  training and evaluation), where the backend reports one (GPU, TPU; None on CPU). It is one
  row's own only when each row runs in its own process, as compare_architectures does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import gin

from benchmarks import architectures_bench
from efficientlm import gin_config, main, storage

MEMORY_FILE = 'memory.json'


def step_memory() -> dict:
  """Memory analysis of the train step the parsed gin config describes."""
  model = gin_config.macro('MODEL')
  optimizer = gin.query_parameter('trainer.train.optimizer').scoped_configurable_fn()
  lengths = gin_config.macro('TASK_FEATURE_LENGTHS')
  compiled, _, _ = architectures_bench.compile_train_step(
      model, optimizer, gin_config.macro('BATCH_SIZE'), lengths['targets'],
      gin_config.macro('PARTITIONER'))
  stats = architectures_bench.memory(compiled)
  return {'step_memory_bytes': stats['memory_bytes'], 'step_temp_bytes': stats['temp_bytes']}


def run(argv: Sequence[str]) -> int:
  """efficientlm.main's exit status; memory.json written when it is 0."""
  status = main.run(list(argv))
  if status == 0:
    peak = architectures_bench.device_peak_bytes()  # before compiling anything more
    record = {**step_memory(), 'device_peak_bytes': peak}
    path = storage.as_path(gin_config.macro('MODEL_DIR')) / MEMORY_FILE
    path.write_text(json.dumps(record, indent=2) + '\n')
  return status


if __name__ == '__main__':
  sys.exit(run(sys.argv[1:]))
