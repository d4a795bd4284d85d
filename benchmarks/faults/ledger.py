"""The books: every checkpoint directory the run wrote (an "instance": a step may be written again
after its first copy was moved aside), every corruption, and what each run did to them.

After each run (`after_run`):
- the instances it moved aside (its "Checkpoint X is unreadable ... Moved it to Y" lines, checked
  against the directory): one carrying a corruption not yet read -> that corruption is detected;
  one carrying none -> a false alarm (an intact checkpoint declared unreadable; also a loss);
- the instance it resumed from: a corruption on it not yet read -> harmless if the independent
  check found its item restores as the pristine copy's, undetected and harmful (a trainer bug)
  if it found otherwise, 'accepted, not judged' if it could not read the pristine copy either.
  Steps older than the one resumed from were not read: their corruptions stay pending;
- every intact instance must still be there, byte for byte (sha256 of every file): one that is
  gone is a lost checkpoint, unless the keep-last-N policy removed it (N newer steps exist);
- new step directories (committed: `<digits>`) are entered as intact instances.
Corruptions never read by any run are reported as such at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re

_STEP_DIR = re.compile(r'^\d+$')


def manifest(directory: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob('*')) if p.is_file()}


@dataclasses.dataclass
class Instance:
  step: int
  name: str  # its directory under checkpoints/
  written_by_run: int
  files: dict[str, str]  # manifest when entered (after a corruption: as corrupted)
  corruptions: list[int] = dataclasses.field(default_factory=list)
  fate: str = 'present'  # present | moved aside | missing | removed by keep policy


class Ledger:

  def __init__(self, checkpoints: pathlib.Path, keep: int | None):
    self.checkpoints = checkpoints
    self.keep = keep
    self.instances: list[Instance] = []
    self.corruptions: list[dict] = []
    self.lost: list[dict] = []
    self.false_alarms: list[dict] = []
    self.modified: list[dict] = []
    self.unexplained: list[dict] = []  # anything the trainer did that the books cannot explain

  def live(self) -> dict[int, Instance]:
    return {i.step: i for i in self.instances if i.fate == 'present'}

  def newest_first(self) -> list[Instance]:
    return sorted(self.live().values(), key=lambda i: -i.step)

  # --- corruptions -------------------------------------------------------------------------------

  def add_corruption(self, instance: Instance, record: dict) -> dict:
    record = {'id': len(self.corruptions), 'step': instance.step, **record,
              'outcome': 'pending'}
    self.corruptions.append(record)
    instance.corruptions.append(record['id'])
    instance.files = manifest(self.checkpoints / instance.name)
    return record

  def _pending(self, instance: Instance) -> list[dict]:
    return [self.corruptions[c] for c in instance.corruptions
            if self.corruptions[c]['outcome'] == 'pending']

  # --- a run -------------------------------------------------------------------------------------

  def after_run(self, run: int, record: dict) -> list[dict]:
    """Updates the books from a finished run; returns the events it found."""
    events = []
    live = self.live()
    for moved in record['unreadable']:
      step = int(pathlib.Path(moved['step_dir']).name)
      instance = live.pop(step, None)
      target = pathlib.Path(moved['moved_to'])
      if instance is None or not target.is_dir() or target.parent != self.checkpoints:
        self.unexplained.append({'run': run, 'what': 'moved aside, not as the books expect',
                                 **moved})
        continue
      instance.fate, instance.name = 'moved aside', target.name
      pending = self._pending(instance)
      for c in pending:
        c.update(outcome='detected', detected_in_run=run, trainer_said=moved['reason'])
        events.append({'event': 'detected', 'run': run, 'corruption': c['id'], 'step': step})
      if not instance.corruptions:
        alarm = {'run': run, 'step': step, 'reason': moved['reason']}
        self.false_alarms.append(alarm)
        self.lost.append({**alarm, 'how': 'moved aside'})
        events.append({'event': 'false alarm', **alarm})
    resumed = record['resumed_from']
    if resumed is not None and resumed in live:
      for c in self._pending(live[resumed]):
        verdict = c['independent']['verdict']
        c.update(outcome={'same': 'harmless', 'unknown': 'accepted, not judged'}.get(
            verdict, 'undetected and harmful'), read_in_run=run)
        events.append({'event': c['outcome'], 'run': run, 'corruption': c['id'],
                       'step': resumed})
    elif resumed is not None:
      self.unexplained.append({'run': run, 'what': f'resumed from step {resumed}, which the '
                               'books do not have'})
    # Newer than the step it resumed from (or any, from scratch), yet neither read nor moved aside.
    tried = {s for s in live if resumed is None or s > resumed}
    if tried and record['start_step'] is not None:
      self.unexplained.append({'run': run, 'what': f'steps {sorted(tried)} skipped, not moved'})
    events += self._check_intact(run, live)
    for path in sorted(self.checkpoints.iterdir()):
      if _STEP_DIR.match(path.name) and int(path.name) not in self.live():
        self.instances.append(Instance(int(path.name), path.name, run, manifest(path)))
    return events

  def _check_intact(self, run: int, live: dict[int, Instance]) -> list[dict]:
    events = []
    present = {int(p.name) for p in self.checkpoints.iterdir() if _STEP_DIR.match(p.name)}
    for step, instance in live.items():
      if step in present:
        if instance.files != manifest(self.checkpoints / instance.name):
          self.modified.append({'run': run, 'step': step})
          events.append({'event': 'checkpoint modified', 'run': run, 'step': step})
        continue
      newer = sum(1 for s in present if s > step)
      if self.keep is not None and newer >= self.keep:
        instance.fate = 'removed by keep policy'
        continue
      instance.fate = 'missing'
      if not instance.corruptions:
        self.lost.append({'run': run, 'step': step, 'how': 'deleted'})
        events.append({'event': 'lost', 'run': run, 'step': step})
      else:
        self.unexplained.append({'run': run, 'what': f'corrupted step {step} disappeared'})
    return events

  def never_read(self) -> None:
    for c in self.corruptions:
      if c['outcome'] == 'pending':
        c['outcome'] = 'never read'
