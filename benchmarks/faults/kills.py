"""Which kills to send and when, and one run of the job driven to its kill (or its end).

Kinds:
- sigkill_save: SIGKILL while a checkpoint is being saved: `delay` seconds after the progress line
  of a checkpoint step (the save hook runs right after it; the save then commits in the
  background), before its `saved checkpoint` line. If that line comes first, the save was too
  quick: the next checkpoint step is tried with half the delay.
- sigkill_step: SIGKILL at a random moment of a training step with no save in flight (every
  save reached has been announced).
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
  """The first step to act at, past `start`; None if the run is too short for it."""
  target = max(kill.planned_step, start + 1 + rng.randrange(every))
  if kill.kind == 'sigkill_save':
    return min(-(-target // every) * every, steps)  # a checkpoint step (the last step saves too)
  target = min(target, steps - 1)
  return target if target > start else None


def _save_state(checkpoints: pathlib.Path, step: int) -> str:
  """Where the save of `step` is, as the file system shows it."""
  if (checkpoints / str(step)).exists():
    return 'committed, not yet announced'
  if any(checkpoints.glob(f'{step}.orbax-checkpoint-tmp*')):
    return 'writing (temporary directory present)'
  return 'starting (no directory yet)'


def metrics_text(line: str) -> str:
  """A progress line's training metrics (loss and accuracy, as printed), without timings or
  progress: equal between two runs of the same step only if they trained alike."""
  match = re.match(r'step \d+: (loss \S+)\s+(accuracy \S+)', line)
  return f'{match.group(1)} {match.group(2)}' if match else line


def drive(child: Child, kill: Kill | None, *, steps: int, every: int, checkpoints: pathlib.Path,
          rng: random.Random, save_delay: float, timeout: float) -> dict:
  """Reads the run's lines, sends `kill` when due, and returns what happened: start, resumed
  step, checkpoints moved aside, saves (with how long each took from its step's line), each
  step's metrics (key '_metrics', not for the JSON), the kill and the exit status."""
  record = {'kill': None if kill is None else kill.kind, 'start_step': None,
            'resumed_from': None, 'unreadable': [], 'saved': [], 'save_latency_s': [],
            'sigterm_saved': None, 'last_step': None, 'kill_sent': None, '_metrics': {}}
  step_seen_at: dict[int, float] = {}
  unsaved: set[int] = set()  # checkpoint steps reached whose save has not been announced
  target = armed = None  # armed: (deadline, (kind, step))
  delay = save_delay
  deadline_run = time.monotonic() + timeout
  while True:
    now = time.monotonic()
    if armed is not None and now >= armed[0]:
      record['kill_sent'], armed = _fire(child, armed[1], record, checkpoints), None
      continue
    if now >= deadline_run and record['kill_sent'] is None:
      record['kill_sent'] = {'kind': 'timeout', 'at_s': round(child.signal(signal.SIGKILL), 3)}
    wait = min(5.0 if armed is None else armed[0] - now, max(0.0, deadline_run - now))
    item = child.next_line(max(0.0, wait))
    if item is EOF_:
      break
    if item is TIMEOUT:
      continue
    at, line = item
    if m := _START.search(line):
      record['start_step'], record['start_up_s'] = int(m.group(1)), round(at, 2)
      if kill is not None:
        target = record['target_step'] = _target(kill, record['start_step'], steps, every, rng)
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
      unsaved.discard(saved)
      if saved in step_seen_at:
        record['save_latency_s'].append(round(at - step_seen_at[saved], 3))
      if armed is not None and armed[1] == ('sigkill_save', saved):
        record.setdefault('save_kill_misses', []).append(
            {'step': saved, 'delay_s': round(delay, 3)})  # committed before the kill: next one
        delay, armed = delay / 2, None
        target = saved + every if saved + every <= steps else None
    elif m := _STEP.match(line):
      step = int(m.group(1))
      record['last_step'], step_seen_at[step] = step, at
      record['_metrics'][step] = metrics_text(line)
      record.setdefault('first_step_s', round(at, 2))
      saves = step % every == 0 or step == steps
      if saves:
        unsaved.add(step)
      if target is None or armed is not None or record['kill_sent'] is not None or step < target:
        continue
      if kill.kind == 'sigterm':
        armed = (time.monotonic(), ('sigterm', step))
      elif kill.kind == 'sigkill_step' and not saves and not unsaved and step < steps:
        armed = (time.monotonic() + rng.uniform(0.0, 0.1), ('sigkill_step', step))
      elif kill.kind == 'sigkill_save' and saves:
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
