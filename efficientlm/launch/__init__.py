"""Launching efficientlm on Cloud TPU VM slices (scripts/launch_tpu.py is the command line).

tpu_slices: accelerator types -> chips, hosts, JAX devices and default runtime versions.
preflight: checks the user's gins against the slice before any TPU time is spent.
gcloud: the gcloud command lines; worker: the shell run on every TPU VM worker.
runner: runs the commands, or only prints them (--dry-run). jobs: the subcommands as steps.
"""
