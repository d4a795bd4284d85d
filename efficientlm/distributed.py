"""Multi-process start-up: `jax.distributed` before anything touches a device.

Three cases, chosen by the entry point's flags (efficientlm.main):
- one process (default): nothing to do;
- `--distributed`: `jax.distributed.initialize()` with no arguments, which finds the coordinator
  itself on Cloud TPU VMs (every worker of a slice, or of a multi-slice job), SLURM and other
  clusters jax knows; scripts/launch_tpu.py passes it on multi-host slices;
- `--coordinator_address/--num_processes/--process_id`: an explicit cluster, e.g. several
  processes on one machine (the multi-process tests run two on CPU).
Processes on the CPU backend talk over gloo, since the CPU client has no collectives otherwise.
"""

from __future__ import annotations

import jax


def initialize(auto: bool = False, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Joins the cluster; returns whether jax.distributed was initialized."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError('An explicit cluster needs --coordinator_address, --num_processes and '
                       f'--process_id together; got {explicit}.')
    if auto:
      raise ValueError('Pass either --distributed (auto-detect) or an explicit cluster, not both.')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id {process_id} must be in [0, {num_processes}).')
  elif not auto:
    return False
  # Only the CPU client reads this; it must be set before the backend starts.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True
