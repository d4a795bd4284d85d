"""What every benchmark's JSON records about the machine and software it ran on."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform

import jax

RESULTS = pathlib.Path(__file__).parent / 'results'


def machine_info() -> dict:
  import flax  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  return {
      'platform': devices[0].platform,
      'device_kind': devices[0].device_kind,
      'device_count': len(devices),
      'cpu_count': os.cpu_count(),
      'python': platform.python_version(),
      'jax': jax.__version__,
      'flax': flax.__version__,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


def write(name: str, config: dict, results) -> pathlib.Path:
  """Writes results/<name>_<platform>.json and returns its path."""
  info = machine_info()
  path = RESULTS / f'{name}_{info["platform"]}.json'
  RESULTS.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({'machine': info, 'config': config, 'results': results}, indent=2)
                  + '\n')
  return path
