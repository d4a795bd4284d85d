"""The shell commands run on every TPU VM worker: install, start, follow the log, stop.

Paths are relative to the worker's home directory: the checkout in ~/efficientlm (replaced by
every install), its virtual environment in ~/efficientlm-venv and the logs in
~/efficientlm-logs, both kept across installs. TPU VM images ship Python 3.10 and efficientlm
needs 3.11+, so uv creates the environment with a Python of its own.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

ARCHIVE = 'efficientlm.tar.gz'  # the packed checkout, copied to every worker's home
CHECKOUT = '~/efficientlm'
VENV = '~/efficientlm-venv'
LOGS = '~/efficientlm-logs'
PYTHON_VERSION = '3.11'
UV = '~/.local/bin/uv'


def install(python_version: str = PYTHON_VERSION) -> str:
  """Unpacks the checkout and installs it (editable, so gin finds configs/) with jax[tpu], at the
  versions of constraints.txt."""
  return ' && '.join([
      'set -e',
      f'rm -rf {CHECKOUT}', f'mkdir -p {CHECKOUT}', f'tar -xzf ~/{ARCHIVE} -C {CHECKOUT}',
      'python3 -m pip install --user --quiet --upgrade uv',
      f'{UV} venv --allow-existing --python {python_version} {VENV}',
      f'cd {CHECKOUT}',
      f'{UV} pip install --python {VENV}/bin/python -c constraints.txt -e ".[data,tpu]"',
      f'{VENV}/bin/python -c "import jax, efficientlm; print(jax.__version__)"',
  ])


_SAFE = re.compile(r'[A-Za-z0-9_@%+=:,./~-]*')


def shell_word(arg: str) -> str:
  """`arg` as one shell word, special characters backslash-escaped rather than single-quoted, so
  the command still reads well once gcloud's --command='...' quotes it again (a leading ~ is
  left to expand, for the paths here)."""
  if _SAFE.fullmatch(arg):
    return arg
  if '\n' in arg:
    return shlex.quote(arg)
  return ''.join(c if _SAFE.fullmatch(c) else '\\' + c for c in arg)


def gin_string(value: str) -> str:
  """A gin (Python) string literal, double-quoted when it can be."""
  return f'"{value}"' if '"' not in value and '\\' not in value else repr(value)


def log_path(name: str) -> str:
  return f'{LOGS}/{name}.log'


def pid_path(name: str) -> str:
  return f'{LOGS}/{name}.pid'


def main_argv(gin_files: Sequence[str], gin_overrides: Sequence[str], run_mode: str = 'train',
              distributed: bool = False) -> list[str]:
  """`python -m efficientlm.main` with the gin files and `--gin.NAME=VALUE` overrides;
  `distributed` (several hosts) makes every worker join one jax.distributed cluster, whose
  coordinator jax finds itself on TPU VMs."""
  return ([f'{VENV}/bin/python', '-m', 'efficientlm.main'] +
          [f'--gin_file={f}' for f in gin_files] +
          [f'--gin.{o}' for o in gin_overrides] + [f'--run_mode={run_mode}'] +
          (['--distributed'] if distributed else []))


def start(name: str, main: Sequence[str]) -> str:
  """Starts `main` in the background under nohup (it outlives the ssh session), its output in a
  log file per worker and its process id next to it, for `stop`."""
  command = ' '.join(shell_word(a) for a in main)
  return (f'mkdir -p {LOGS} && cd {CHECKOUT} && '
          f'{{ nohup {command} > {log_path(name)} 2>&1 < /dev/null & '
          f'echo $! > {pid_path(name)}; }}')


def follow_log(name: str) -> str:
  return f'tail -n +1 -F {log_path(name)}'


def stop(name: str) -> str:
  return (f'if [ -f {pid_path(name)} ]; then kill "$(cat {pid_path(name)})" || true; '
          f'rm -f {pid_path(name)}; fi')
