"""Runs efficientlm on a Cloud TPU VM slice: create, install, run, follow the log, tear down.

  python scripts/launch_tpu.py up --name=t5-large --zone=us-central2-b --accelerator-type=v4-32 \
      --gin_file=runs/tpu_pretrain_t5_1_1.gin --model-dir=gs://BUCKET/t5_1_1_large [--spot] \
      [--queued [--num-slices=2]] [--gin.BATCH_SIZE=512 ...] [--dry-run]

Subcommands: up (= check, create, install, run, logs), check (the preflight alone: the gins
against the slice, no gcloud), create, install, run (check, then start on all workers), logs
(follow host 0's log), stop (kill the run on all workers), delete. `--dry-run` prints every
command instead of running it. `--gin.NAME=VALUE` overrides pass through to efficientlm.main.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from efficientlm.launch import gcloud, jobs, preflight, tpu_slices  # noqa: E402
from efficientlm.launch.runner import Runner  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='scripts/launch_tpu.py', description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('subcommand', choices=sorted(jobs.SUBCOMMANDS))
  parser.add_argument('--name', required=True, help='TPU VM (or queued resource) name')
  parser.add_argument('--zone', required=True)
  parser.add_argument('--project', default=None, help='default: gcloud config')
  parser.add_argument('--accelerator-type', default=None,
                      help='e.g. v4-32, v5p-128, v5litepod-64, v6e-8 (create, run, up, check)')
  parser.add_argument('--runtime-version', default=None,
                      help='TPU VM software version; default per generation: ' + ', '.join(
                          f'{g.prefix}: {g.runtime_version}'
                          for g in tpu_slices.GENERATIONS.values()))
  parser.add_argument('--spot', action='store_true', help='Spot TPU VMs (preemptible, cheaper)')
  parser.add_argument('--queued', action='store_true', help='create through a queued resource')
  parser.add_argument('--num-slices', type=int, default=1,
                      help='Multislice: this many slices (needs --queued and '
                      'partitioning.Partitioner.dcn_mesh_shape)')
  parser.add_argument('--gin_file', action='append', default=[],
                      help='gin file, relative to configs/ or the checkout (repeatable)')
  parser.add_argument('--model-dir', default=None, help='MODEL_DIR, gs://BUCKET/PATH')
  parser.add_argument('--run-mode', default='train', help='efficientlm.main --run_mode')
  parser.add_argument('--poll-seconds', type=float, default=30.0,
                      help='how often create polls a queued resource')
  parser.add_argument('--dry-run', action='store_true',
                      help='print the commands instead of running them')
  return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  args.gin_overrides = []
  for flag in rest:
    if not flag.startswith('--gin.') or '=' not in flag:
      parser.error(f'unrecognized argument {flag!r}')
    args.gin_overrides.append(flag[len('--gin.'):])
  return args


def make_job(args: argparse.Namespace) -> jobs.Job:
  target = gcloud.Target(name=args.name, zone=args.zone, project=args.project,
                         queued=args.queued, num_slices=args.num_slices)
  return jobs.Job(target=target, accelerator_type=args.accelerator_type,
                  runtime_version=args.runtime_version, spot=args.spot,
                  gin_files=args.gin_file, gin_overrides=args.gin_overrides,
                  model_dir=args.model_dir, run_mode=args.run_mode,
                  poll_seconds=args.poll_seconds)


def main(argv: list[str] | None = None, runner: Runner | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  runner = runner or Runner(dry_run=args.dry_run)
  try:
    job = make_job(args)
    jobs.SUBCOMMANDS[args.subcommand](job, runner)
  except preflight.PreflightError as e:
    print(f'launch_tpu: preflight failed, nothing was started: {e}', file=sys.stderr)
    return 2
  except ValueError as e:
    print(f'launch_tpu: {e}', file=sys.stderr)
    return 2
  except subprocess.CalledProcessError as e:
    print(f'launch_tpu: command failed with exit status {e.returncode}: '
          f'{" ".join(map(str, e.cmd))}', file=sys.stderr)
    return e.returncode or 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
