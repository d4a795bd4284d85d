"""What is kept and what is dropped of Orbax's failure logging (orbax_noise), on hand-built log
records; the end-to-end case (a full tmpfs) is in test_run_safety."""

import logging
import sys

from efficientlm.training import orbax_noise


def _raised_in(filename: str):
  """exc_info of an error whose traceback passes through `filename`."""
  code = compile('raise ValueError("RESOURCE_EXHAUSTED: disk full")', filename, 'exec')
  try:
    exec(code)  # pylint: disable=exec-used
  except ValueError:
    return sys.exc_info()
  raise AssertionError('unreachable')


def _record(level, pathname, msg, exc_info=None, name='absl'):
  return logging.LogRecord(name, level, pathname, 1, msg, (), exc_info)


def test_the_first_orbax_error_of_an_operation_stays_without_its_traceback_repeats_go():
  errors = orbax_noise._OrbaxErrors()  # pylint: disable=protected-access
  orbax_file = '/site-packages/orbax/checkpoint/_src/futures/future.py'
  first = _record(logging.ERROR, orbax_file, 'thread raised', _raised_in(orbax_file))
  assert errors.filter(first)
  assert first.exc_info is None and first.getMessage() == 'thread raised (ValueError)'
  assert not errors.filter(_record(logging.ERROR, orbax_file, 'commit failed'))
  assert errors.filter(_record(logging.WARNING, orbax_file, 'a warning is never dropped'))
  assert errors.filter(_record(logging.ERROR, '/site-packages/jax/x.py', 'not from orbax'))
  assert errors.dropped == 1
  errors.shown = False  # what orbax_noise.new_operation() does for the module's filter
  assert errors.filter(_record(logging.ERROR, orbax_file, 'the next save fails too'))


def test_abandoned_orbax_tasks_and_futures_are_dropped_others_are_not():
  leftovers = orbax_noise._DropOrbaxLeftoverTasks()  # pylint: disable=protected-access
  base_events = '/python3.11/asyncio/base_events.py'
  gathering = _record(
      logging.ERROR, base_events, '_GatheringFuture exception was never retrieved\nfuture: '
      '<_GatheringFuture finished exception=ValueError(...)>',
      _raised_in('/site-packages/orbax/checkpoint/_src/serialization/serialization.py'),
      name='asyncio')
  assert not leftovers.filter(gathering)
  by_path = _record(logging.ERROR, base_events, 'Task exception was never retrieved\nfuture: '
                    '<Task finished exception=ValueError("/run/checkpoints/20.orbax-checkpoint-'
                    'tmp/params")>', name='asyncio')
  assert not leftovers.filter(by_path)
  theirs = _record(logging.ERROR, base_events, 'Task exception was never retrieved',
                   _raised_in('/home/me/my_server.py'), name='asyncio')
  assert leftovers.filter(theirs)
  assert leftovers.filter(_record(logging.ERROR, base_events, 'Unclosed client session',
                                  name='asyncio'))
