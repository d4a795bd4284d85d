"""Which kills to send and when, and one run of the job driven to its kill (or its end).

Kinds:
- sigkill_save: SIGKILL while a checkpoint is being saved: `delay` seconds after the progress line
  of a checkpoint step (the save hook runs right after it; the save then commits in the
  background), before its `saved checkpoint` line. If that line comes first, the save was too
  quick: the next checkpoint step is tried with half the delay.
- sigkill_step: SIGKILL at a random moment of a training step with no save in flight.
- sigterm: SIGTERM (a preemption) right after a step; the trainer should save that step and exit 0.

Each run's timeline is read from the lines the trainer prints (efficientlm.training.trainer and
checkpoints): `... steps A -> B`, `resumed from .../checkpoints/N`, `step N:`, `saved checkpoint
N`, `SIGTERM: saved checkpoint N and stopped`, `Checkpoint X is unreadable: ... Moved it to Y`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import random
import re
import signal
import time

from benchmarks.faults.child import EOF_, TIMEOUT, Child

KINDS = ('sigkill_save', 'sigkill_step', 'sigterm')

_STEP = re.compile(r'^step (\d+):')
_SAVED = re.compile(r'^saved checkpoint (\d+)$')
_SIGTERM_SAVED = re.compile(r'^SIGTERM: saved checkpoint (\d+) and stopped')
_START = re.compile(r'steps (\d+) -> (\d+)$')
_RESUMED = re.compile(r'^resumed from .*/(\d+)$')
_UNREADABLE = re.compile(r'^Checkpoint (\S+) is unreadable: (.*)\. Moved it to (\S+) \(')


@dataclasses.dataclass
class Kill:
  kind: str
  planned_step: int  # the earliest step to kill at (moved past the run's start if needed)


def plan(count: int, kinds, steps: int, rng: random.Random) -> list[Kill]:
  """`count` kills, the kinds in turn (shuffled), at steps spread over the run."""
  order = [kinds[i % len(kinds)] for i in range(count)]
  rng.shuffle(order)
  at = sorted(rng.sample(range(1, steps), min(count, steps - 1)))
  at += [steps - 1] * (count - len(at))
  return [Kill(kind, step) for kind, step in zip(order, at)]


def _target(kill: Kill, start: int, steps: int, every: int, rng: random.Random) -> int | None:
  """The step to act at, past `start`; None if the run is too short for it."""
  target = max(kill.planned_step, start + 1 + rng.randrange(every))
  if kill.kind == 'sigkill_save':
    return min(-(-target // every) * every, steps)  # a checkpoint step (the last step saves too)
  target = min(target, steps - 1)
  while kill.kind == 'sigkill_step' and target > start and (target % every in (0, 1)):
    target -= 1  # no save in flight: neither this step nor the one before saves
  return target if target > start else None


def _save_state(checkpoints: pathlib.Path, step: int) -> str:
  """Where the save of `step` is, as the file system shows it."""
  if (checkpoints / str(step)).exists():
    return 'committed, not yet announced'
  if any(checkpoints.glob(f'{step}.orbax-checkpoint-tmp*')):
    return 'writing (temporary directory present)'
  return 'starting (no directory yet)'


def drive(child: Child, kill: Kill | None, *, steps: int, every: int, checkpoints: pathlib.Path,
          rng: random.Random, save_delay: float, timeout: float) -> dict:
  """Reads the run's lines, sends `kill` when due, and returns what happened: start, resumed
  step, checkpoints moved aside, saves (with how long each took from its step's line), the kill
  and the exit status."""
  record = {'kill': None if kill is None else kill.kind, 'start_step': None,
            'resumed_from': None, 'unreadable': [], 'saved': [], 'save_latency_s': [],
            'sigterm_saved': None, 'last_step': None, 'kill_sent': None}
  step_seen_at: dict[int, float] = {}
  target = armed = None  # armed: (deadline, what)
  delay = save_delay
  deadline_run = time.monotonic() + timeout
  while True:
    wait = None if armed is None else max(0.0, armed[0] - time.monotonic())
    wait = min(wait if wait is not None else 5.0, max(0.0, deadline_run - time.monotonic()))
    item = child.next_line(wait)
    if item is EOF_:
      break
    if item is TIMEOUT:
      if armed is not None and time.monotonic() >= armed[0]:
        record['kill_sent'] = _fire(child, armed[1], record, checkpoints)
        armed = None
      elif time.monotonic() >= deadline_run:
        record['kill_sent'] = {'kind': 'timeout', 'at_s': round(child.signal(signal.SIGKILL), 3)}
      continue
    at, line = item
    if m := _START.search(line):
      record['start_step'], record['start_up_s'] = int(m.group(1)), round(at, 2)
      if kill is not None:
        target = _target(kill, record['start_step'], steps, every, rng)
        record['target_step'] = target
    elif m := _RESUMED.match(line):
      record['resumed_from'] = int(m.group(1))
    elif m := _UNREADABLE.match(line):
      record['unreadable'].append({'step_dir': m.group(1), 'reason': m.group(2),
                                   'moved_to': m.group(3)})
    elif m := _SIGTERM_SAVED.match(line):
      record['sigterm_saved'] = int(m.group(1))
    elif m := _SAVED.match(line):
      saved = int(m.group(1))
      record['saved'].append(saved)
      if saved in step_seen_at:
        record['save_latency_s'].append(round(at - step_seen_at[saved], 3))
      if armed is not None and armed[1] == ('sigkill_save', saved):
        record.setdefault('save_kill_misses', []).append(
            {'step': saved, 'delay_s': round(delay, 3)})  # committed before the kill: next one
        delay, armed, target = delay / 2, None, min(saved + every, steps)
        if target <= saved:
          target = None
    elif m := _STEP.match(line):
      step = int(m.group(1))
      record['last_step'], step_seen_at[step] = step, at
      record.setdefault('first_step_s', round(at, 2))
      if target is None or armed is not None or record['kill_sent'] is not None:
        continue
      if kill.kind == 'sigterm' and step >= target:
        armed = (time.monotonic(), ('sigterm', step))
      elif kill.kind == 'sigkill_step' and step >= target and step % every not in (0, 1):
        armed = (time.monotonic() + rng.uniform(0.0, 0.1), ('sigkill_step', step))
      elif kill.kind == 'sigkill_save' and step >= target and (step % every == 0 or
                                                               step == steps):
        armed = (time.monotonic() + rng.uniform(0.0, delay), ('sigkill_save', step))
  record['exit_status'] = child.finish(timeout=120)
  record['wall_s'] = round(time.monotonic() - child.started, 2)
  return record


def _fire(child: Child, what, record, checkpoints) -> dict:
  kind, step = what
  sent = {'kind': kind, 'after_step_line': step, 'last_step_line': record['last_step']}
  if kind == 'sigkill_save':
    sent['save_state'] = _save_state(checkpoints, step)
  sent['at_s'] = round(child.signal(signal.SIGTERM if kind == 'sigterm' else signal.SIGKILL), 3)
  return sent
