"""The gcloud command lines of a TPU VM job, as argv lists (the Runner runs or prints them).

A job is one TPU VM node (`tpu-vm create`), or a queued resource (`queued-resources create`)
holding one node (`--node-id`) or, for Multislice, `--node-count` nodes named PREFIX-0, PREFIX-1,
... (`--node-prefix`; the TPU API's MultisliceParams). Multislice needs queued resources. Commands
on every worker use `--worker=all` (and `--node=all` across slices), which gcloud runs on the
workers in parallel. References: cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/*
and .../queued-resources/{create,describe,ssh,delete}.
"""

from __future__ import annotations

import dataclasses
import re

from efficientlm.launch import tpu_slices

_NAME = re.compile(r'^[a-z]([-a-z0-9]{0,46}[a-z0-9])?$')


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a job's TPU VMs are: the node (or queued resource) name, zone and project."""

  name: str
  zone: str
  project: str | None = None
  queued: bool = False
  num_slices: int = 1

  def __post_init__(self):
    if not _NAME.match(self.name):
      raise ValueError(f'--name {self.name!r}: TPU names are lowercase letters, digits and '
                       'hyphens, start with a letter and end with a letter or digit.')
    if not self.zone:
      raise ValueError('--zone is required (e.g. us-central2-b for v4, us-east5-a for v5p).')
    if self.num_slices < 1:
      raise ValueError(f'--num-slices {self.num_slices}: must be at least 1.')
    if self.num_slices > 1 and not self.queued:
      raise ValueError(f'--num-slices {self.num_slices} needs --queued: Multislice slices are '
                       'created only as queued resources.')

  @property
  def multislice(self) -> bool:
    return self.num_slices > 1

  @property
  def nodes(self) -> list[str]:
    """The TPU VM node names: the job name, or NAME-0 ... NAME-(n-1) for Multislice."""
    if self.multislice:
      return [f'{self.name}-{i}' for i in range(self.num_slices)]
    return [self.name]

  def location_flags(self) -> list[str]:
    return [f'--zone={self.zone}'] + ([f'--project={self.project}'] if self.project else [])


_TPUS = ['gcloud', 'compute', 'tpus']


def create(target: Target, slice_type: tpu_slices.SliceType, runtime_version: str,
           spot: bool = False) -> list[str]:
  """Creates the node, or queues the request for the node(s)."""
  accelerator = f'--accelerator-type={slice_type.accelerator_type}'
  spot_flags = ['--spot'] if spot else []
  if not target.queued:
    return (_TPUS + ['tpu-vm', 'create', target.name] + target.location_flags() +
            [accelerator, f'--version={runtime_version}'] + spot_flags)
  nodes = ([f'--node-count={target.num_slices}', f'--node-prefix={target.name}']
           if target.multislice else [f'--node-id={target.name}'])
  return (_TPUS + ['queued-resources', 'create', target.name] + target.location_flags() +
          [accelerator, f'--runtime-version={runtime_version}'] + nodes + spot_flags)


def queued_state(target: Target) -> list[str]:
  """Prints the queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, ...)."""
  return (_TPUS + ['queued-resources', 'describe', target.name] + target.location_flags() +
          ['--format=value(state.state)'])


def scp_to_all_workers(target: Target, local_path: str, remote_path: str) -> list[list[str]]:
  """Copies a file to every worker of every node (one command per node)."""
  return [_TPUS + ['tpu-vm', 'scp', local_path, f'{node}:{remote_path}'] +
          target.location_flags() + ['--worker=all'] for node in target.nodes]


def ssh(target: Target, command: str, worker: str = 'all') -> list[str]:
  """Runs a shell command on `worker` ('all', or a worker index) of every node, or of node 0
  for a single worker; gcloud starts the --worker=all commands on all workers together."""
  if target.multislice:
    node = 'all' if worker == 'all' else '0'
    return (_TPUS + ['queued-resources', 'ssh', target.name] + target.location_flags() +
            [f'--node={node}', f'--worker={worker}', f'--command={command}'])
  return (_TPUS + ['tpu-vm', 'ssh', target.name] + target.location_flags() +
          [f'--worker={worker}', f'--command={command}'])


def delete(target: Target) -> list[str]:
  """Deletes the node, or the queued resource with its nodes (--force)."""
  if target.queued:
    return (_TPUS + ['queued-resources', 'delete', target.name] + target.location_flags() +
            ['--force', '--quiet'])
  return _TPUS + ['tpu-vm', 'delete', target.name] + target.location_flags() + ['--quiet']
