"""The launcher's subcommands as sequences of gcloud commands on one Runner.

`up` = preflight, create, install, run, logs. Preflight comes first in `up` and `run`, so a
config that cannot run on the slice stops before any TPU is created or any worker is touched.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

from efficientlm.launch import checkout, gcloud, preflight, tpu_slices, worker
from efficientlm.launch.runner import Runner

QUEUED_FAILED = ('FAILED', 'SUSPENDED', 'SUSPENDING', 'DELETING')


@dataclasses.dataclass
class Job:
  """Everything the subcommands need; fields unused by a subcommand may stay empty."""

  target: gcloud.Target
  accelerator_type: str | None = None
  runtime_version: str | None = None  # default: the generation's
  spot: bool = False
  gin_files: list[str] = dataclasses.field(default_factory=list)
  gin_overrides: list[str] = dataclasses.field(default_factory=list)  # 'NAME=VALUE'
  model_dir: str | None = None
  run_mode: str = 'train'
  source_dir: pathlib.Path = checkout.REPO_ROOT
  poll_seconds: float = 30.0

  @property
  def slice_type(self) -> tpu_slices.SliceType:
    if not self.accelerator_type:
      raise ValueError('--accelerator-type is required (e.g. v4-32, v5p-128, v5litepod-64).')
    return tpu_slices.parse_accelerator_type(self.accelerator_type)

  @property
  def overrides(self) -> list[str]:
    """The --gin. overrides, --model-dir as MODEL_DIR first (a later --gin.MODEL_DIR wins)."""
    model_dir = [f'MODEL_DIR={worker.gin_string(self.model_dir)}'] if self.model_dir else []
    return model_dir + list(self.gin_overrides)


def check(job: Job, runner: Runner) -> preflight.Plan:
  bindings = [f'{name} = {value}' for name, value in (o.split('=', 1) for o in job.overrides)]
  result = preflight.check(job.gin_files, bindings, job.slice_type, job.target.num_slices)
  runner.note(result.summary(job.slice_type, job.target.num_slices))
  return result


def create(job: Job, runner: Runner) -> None:
  slice_type = job.slice_type
  runner.run(gcloud.create(job.target, slice_type, job.runtime_version or
                           slice_type.runtime_version, job.spot))
  if job.target.queued:
    wait_until_active(job, runner)


def wait_until_active(job: Job, runner: Runner) -> None:
  """Polls the queued resource until ACTIVE (`tpu-vm create` itself waits until READY)."""
  runner.note(f'waiting until queued resource {job.target.name} is ACTIVE, polling every '
              f'{job.poll_seconds:g} s')
  start = time.monotonic()
  while True:
    state = runner.output(gcloud.queued_state(job.target), dry_run_result='ACTIVE')
    if runner.dry_run:
      return
    elapsed = int(time.monotonic() - start)
    runner.note(f'{job.target.name}: {state or "(no state yet)"} after {elapsed // 60}m'
                f'{elapsed % 60:02d}s')
    if state == 'ACTIVE':
      return
    if state in QUEUED_FAILED:
      raise RuntimeError(f'Queued resource {job.target.name} is {state}; see `gcloud compute '
                         f'tpus queued-resources describe {job.target.name} --zone='
                         f'{job.target.zone}`, then delete it.')
    runner.sleep(job.poll_seconds)


def install(job: Job, runner: Runner) -> None:
  archive = checkout.archive_path(job.source_dir, job.target.name)
  runner.local(f'pack the checkout {job.source_dir} (git ls-files: tracked and untracked, not '
               f'ignored) into {archive}', lambda: checkout.pack(job.source_dir, archive))
  for command in gcloud.scp_to_all_workers(job.target, str(archive), worker.ARCHIVE):
    runner.run(command)
  runner.run(gcloud.ssh(job.target, worker.install()))


def start(job: Job, runner: Runner) -> None:
  """Starts the run on all workers at once (no preflight; `run` and `up` do it first)."""
  hosts = job.slice_type.hosts * job.target.num_slices
  main = worker.main_argv(job.gin_files, job.overrides, job.run_mode, distributed=hosts > 1)
  runner.run(gcloud.ssh(job.target, worker.start(job.target.name, main)))


def run(job: Job, runner: Runner) -> None:
  check(job, runner)
  start(job, runner)


def logs(job: Job, runner: Runner) -> None:
  runner.note(f'following host 0\'s log {worker.log_path(job.target.name)}; Ctrl-C stops '
              'following, not the run')
  try:
    runner.run(gcloud.ssh(job.target, worker.follow_log(job.target.name), worker='0'))
  except KeyboardInterrupt:
    pass


def stop(job: Job, runner: Runner) -> None:
  runner.run(gcloud.ssh(job.target, worker.stop(job.target.name)))


def delete(job: Job, runner: Runner) -> None:
  runner.run(gcloud.delete(job.target))


def up(job: Job, runner: Runner) -> None:
  check(job, runner)  # before any TPU time
  create(job, runner)
  install(job, runner)
  start(job, runner)
  logs(job, runner)


SUBCOMMANDS = {'up': up, 'create': create, 'install': install, 'run': run, 'logs': logs,
               'stop': stop, 'delete': delete, 'check': check}
