"""The tiny training run as one of several processes on this machine (jax.distributed over
localhost, CPU devices split between the processes):

  python -m tests.training.multiprocess_run DIR STEPS DELAY PROCESS_ID NUM_PROCESSES PORT \
      [hybrid] [hold=INDEX:PATH]

With `hybrid` the mesh is built per process and joined across processes (a multi-slice mesh
with processes standing in for slices): data parallelism over the processes, the model axis
inside each. With `hold`, batch INDEX (step INDEX + 1) waits until the file PATH exists.
"""

from __future__ import annotations

import faulthandler
import os
import sys

TOTAL_DEVICES = 8
# A run still going after this long is hung (the tests wait 240 s): every thread's stack goes to
# stderr, which the tests collect, so a hang in CI shows where it waits.
STACKS_AFTER_S = 200


def main(argv):
  faulthandler.dump_traceback_later(STACKS_AFTER_S)
  directory, steps, delay, process_id, num_processes, port = argv[:6]
  num_processes = int(num_processes)
  # The test's own XLA flags (tests/conftest.py), with this process's share of the devices.
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count=')]
  os.environ['XLA_FLAGS'] = ' '.join(
      flags + [f'--xla_force_host_platform_device_count={TOTAL_DEVICES // num_processes}'])
  from efficientlm import distributed, partitioning  # pylint: disable=g-import-not-at-top
  from tests.training import tiny_run  # pylint: disable=g-import-not-at-top
  distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=num_processes,
                         process_id=int(process_id))
  if 'hybrid' in argv[6:]:
    partitioner = partitioning.Partitioner((1, 4), ('data', 'model'), 'tensor_parallel',
                                           dcn_mesh_shape=(num_processes, 1))
  else:
    partitioner = tiny_run.partitioner()
  hold = next((a[len('hold='):].split(':', 1) for a in argv[6:] if a.startswith('hold=')), None)
  tiny_run.train(directory, int(steps), delay=float(delay), log_every=1, partitioner=partitioner,
                 hold=None if hold is None else (int(hold[0]), hold[1]))


if __name__ == '__main__':
  main(sys.argv[1:])
