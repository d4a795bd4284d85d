"""Loads scripts/launch_tpu.py (a script, not a module) and runs it with a recording Runner."""

from __future__ import annotations

import importlib.util
import io
import pathlib

import pytest

from efficientlm.launch.runner import Runner

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / 'scripts' / 'launch_tpu.py'


@pytest.fixture(scope='session')
def launch_tpu():
  spec = importlib.util.spec_from_file_location('launch_tpu', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def dry_run(launch_tpu):
  """Runs the launcher with --dry-run; returns (exit status, printed lines)."""

  def run(*argv: str) -> tuple[int, list[str]]:
    runner = Runner(dry_run=True, out=io.StringIO())
    status = launch_tpu.main([*argv, '--dry-run'], runner=runner)
    return status, runner.lines

  return run
