"""Fault injection: the `make train` job (runs/recall_tiny.gin, shortened) is killed N times
(SIGKILL during a checkpoint save, SIGKILL during a step, SIGTERM) and M checkpoint files are
damaged (bytes flipped, files truncated) between restarts; it must still end bit-identical to an
uninterrupted run, with every damaged checkpoint detected and no intact one lost.

  python -m benchmarks.fault_injection [--steps 300] [--checkpoint_every 25] [--kills 12] \
      [--corruptions 16] [--seed 0] [--model_dir /tmp/efficientlm_fault_injection]

Each corruption hits the newest intact-looking checkpoint (the one the next run tries first);
while the independent check (benchmarks/faults/independent.py) says the damage changes what that
step restores to, the next one goes to the step the run will fall back to, else waits for the
next restart. Corruptions left when the job has finished go to its final checkpoints, followed by
one more run of the same command. Prints a summary; writes benchmarks/results/fault_injection_
<platform>.json with the config, the summary and every event. 7-12 minutes on 2 busy CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import random
import shutil
import statistics
import threading
import time

from benchmarks.faults import corruption, independent
from benchmarks.faults import kills as kill_lib
from benchmarks.faults.child import Child, command, environment
from benchmarks.faults.ledger import Ledger, manifest

ITEMS = ('params', 'opt_state', 'dataset', 'meta')
MARKER = 'FAULT_INJECTION_ROOT'  # the only kind of directory this benchmark deletes
MAX_FAILED_RUNS = 3


@dataclasses.dataclass
class Config:
  steps: int = 300
  checkpoint_every: int = 25
  kills: int = 12  # four of each kind
  corruptions: int = 16
  seed: int = 0
  model_dir: str = '/tmp/efficientlm_fault_injection'
  keep_checkpoints: int | None = None  # None: no step may legitimately disappear
  kill_kinds: tuple[str, ...] = kill_lib.KINDS
  gin_bindings: tuple[str, ...] = ()  # extra bindings for every run (both runs alike)
  run_timeout_s: float = 900.0
  parallel_reference: bool = False  # the reference run beside the first faulty run (faster)
  save_kill_delay_s: float | None = None  # SIGKILL that long at most after a checkpoint step's
  # line; None: the median time its saves took from that line to 'saved checkpoint' so far


def _fresh_root(path: pathlib.Path) -> pathlib.Path:
  if path.exists() and any(path.iterdir()):
    if not (path / MARKER).exists():
      raise SystemExit(f'{path} exists and was not made by this benchmark; pass another '
                       '--model_dir or remove it.')
    shutil.rmtree(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / MARKER).write_text('made by benchmarks/fault_injection.py; deleted by its next run\n')
  for sub in ('reference', 'faulty', 'pristine', 'logs'):
    (path / sub).mkdir()
  return path


class Benchmark:
  """One benchmark: the reference run, then the faulty run's restarts."""

  def __init__(self, config: Config, env: dict[str, str] | None = None, say=print):
    self.config = config
    self.env = environment(env)
    self.say = say
    self.root = _fresh_root(pathlib.Path(config.model_dir).absolute())
    self.checkpoints = self.root / 'faulty' / 'checkpoints'
    self.ledger = Ledger(self.checkpoints, config.keep_checkpoints)
    self.kill_rng = random.Random(config.seed)
    self.damage_rng = random.Random(config.seed + 1)
    self.events: list[dict] = []
    self.runs: list[dict] = []
    self.save_delay = 0.3  # replaced by the median save time seen
    self._templates: dict[str, object] = {}

  def _run(self, name: str, model_dir: pathlib.Path, kill) -> dict:
    c = self.config
    argv = command(model_dir, c.steps, c.checkpoint_every, c.keep_checkpoints, c.gin_bindings)
    child = Child(argv, self.root / 'logs' / f'{name}.log', self.env)
    record = kill_lib.drive(child, kill, steps=c.steps, every=c.checkpoint_every,
                         checkpoints=model_dir / 'checkpoints', rng=self.kill_rng,
                         save_delay=(self.save_delay if c.save_kill_delay_s is None else
                                     c.save_kill_delay_s), timeout=c.run_timeout_s)
    record['name'] = name
    if record['save_latency_s']:
      self.save_delay = statistics.median(record['save_latency_s'])
    expected = {None: 0, 'sigterm': 0, 'sigkill_save': -9, 'sigkill_step': -9}
    sent = record['kill_sent']
    record['as_expected'] = (record['exit_status'] == expected[sent['kind'] if sent else None] and
                             (sent is None or sent['kind'] != 'timeout'))
    if sent and sent['kind'] == 'sigterm':
      record['as_expected'] &= record['sigterm_saved'] is not None
    if not record['as_expected']:
      record['stderr_tail'] = child.stderr_tail()
    moved = [u['moved_to'].rsplit('/', 1)[-1] for u in record['unreadable']]
    how = f'{sent["kind"]} after step {sent["after_step_line"]}' if sent else 'no kill'
    self.say(f'{name}: steps {record["start_step"]} -> {record["last_step"]}, resumed from '
             f'{record["resumed_from"]}, moved aside {moved}, {how}, exit '
             f'{record["exit_status"]} ({record["wall_s"]} s)')
    return record

  def _inject(self, want: int, before_run: int) -> int:
    """Up to `want` corruptions, newest step first, going on to the next older step only while
    the next run must fall back to it."""
    done = 0
    for instance in self.ledger.newest_first():
      if done == want:
        break
      step_dir = self.checkpoints / instance.name
      path = corruption.choose_file(step_dir, self.damage_rng)
      relative = path.relative_to(step_dir)
      item = relative.parts[0] if relative.parts[0] in ITEMS else None
      template = self._template(item)  # read before anything is damaged
      pristine = corruption.keep_pristine(
          step_dir, self.root / 'pristine' / f'{len(self.ledger.corruptions)}-step{instance.step}')
      what = corruption.damage(path, self.damage_rng)
      check = independent.compare_item(pristine, step_dir, item, template)
      record = self.ledger.add_corruption(instance, {
          'before_run': before_run, 'file': str(relative), 'kind': corruption.kind_of(relative),
          **what, 'pristine_copy': str(pristine.relative_to(self.root)), 'independent': check})
      self.events.append({'event': 'corruption', **record})
      self.say(f'  corrupted step {instance.step}: {what["op"]} {relative} '
               f'({record["kind"]}); independent read: {check["verdict"]}')
      done += 1
      if check['verdict'] == 'same':
        break  # the next run resumes from this step; older ones would not be read
    return done

  def _template(self, item: str | None):
    """An intact checkpoint's `item` arrays (read once): the shapes and shardings onto which the
    independent check reads a damaged step and its pristine copy, as the trainer reads onto its
    abstract state."""
    if item not in independent.ARRAY_ITEMS:
      return None
    if item not in self._templates:
      intact = [i for i in self.ledger.newest_first() if not i.corruptions]
      source = (self.checkpoints / intact[0].name if intact else
                max((self.root / 'reference' / 'checkpoints').glob('[0-9]*'),
                    key=lambda p: int(p.name)))
      self._templates[item] = independent.read_arrays(source / item)
    return self._templates[item]

  def _undo(self, run: int) -> None:
    """After a failed run: puts back the pristine copies of the damaged steps it may have read,
    so the benchmark can go on (the failure itself is reported)."""
    restored = set()
    for c in self.ledger.corruptions:  # oldest first: its copy predates any later damage
      instance = self.ledger.live().get(c['step'])
      if c['outcome'] != 'pending' or instance is None:
        continue
      if c['step'] not in restored:
        shutil.rmtree(self.checkpoints / instance.name)
        shutil.copytree(self.root / c['pristine_copy'], self.checkpoints / instance.name)
        instance.files = manifest(self.checkpoints / instance.name)
        restored.add(c['step'])
      c.update(outcome='stopped the run', read_in_run=run)

  def run(self) -> dict:
    c = self.config
    started = time.monotonic()
    box = {}
    beside = threading.Thread(target=lambda: box.update(
        reference=self._run('reference', self.root / 'reference', None)))
    beside.start()
    if not c.parallel_reference:
      beside.join()
    plan = kill_lib.plan(c.kills, c.kill_kinds, c.steps, self.kill_rng)
    gaps = len(plan)
    quota = [c.corruptions // gaps + (i < c.corruptions % gaps) for i in range(gaps)]
    carried = failures = 0
    finished = False  # the job has reached its last step once: no more kills
    for index in range(c.kills + c.corruptions + MAX_FAILED_RUNS + 1):
      kill = plan[index] if index < len(plan) and not finished else None
      record = self._run(f'run{index + 1}', self.root / 'faulty', kill)
      record['run'] = index + 1
      self.runs.append(record)
      self.events.append({'event': 'run', **{k: v for k, v in _public(record).items()
                                            if k not in ('saved', 'save_latency_s')}})
      self.events += self.ledger.after_run(index + 1, record)
      if not record['as_expected']:
        failures += 1
        self.events.append({'event': 'run failed', 'run': index + 1,
                            'stderr_tail': record.get('stderr_tail', '')})
        self._undo(index + 1)
        if failures >= MAX_FAILED_RUNS:
          break
        continue
      finished |= record['kill_sent'] is None
      want = carried + (quota[index] if index < len(quota) else 0)
      if finished:  # what is left goes to the final checkpoints, read by one more run
        want = c.corruptions - len(self.ledger.corruptions)
        if want == 0 or not self.ledger.live():
          break
      carried = want - self._inject(want, index + 2) if want else 0
    beside.join()
    reference = box['reference']
    for record in self.runs:
      record['diverges_from_reference_at_step'] = _divergence(record, reference)
    self.ledger.never_read()
    final = self.checkpoints / str(c.steps)
    comparison = (independent.compare_final(self.root / 'reference' / 'checkpoints' / str(c.steps),
                                            final) if final.exists() else
                  {'arrays': 0, 'differ': ['no final checkpoint'], 'bit_identical': False})
    return self._results(reference, comparison, time.monotonic() - started)

  def _results(self, reference: dict, comparison: dict, wall: float) -> dict:
    ledger = self.ledger
    outcomes = [x['outcome'] for x in ledger.corruptions]
    sent = [r['kill_sent']['kind'] for r in self.runs if r['kill_sent']]
    summary = {
        'runs': len(self.runs),
        'restarts': len(self.runs) - 1,
        'resumes': sum(r['resumed_from'] is not None for r in self.runs),
        'kills_planned': self.config.kills,
        'kills_sent': {k: sent.count(k) for k in kill_lib.KINDS},
        'sigkill_save_states': [r['kill_sent'].get('save_state') for r in self.runs
                                if r['kill_sent'] and r['kill_sent']['kind'] == 'sigkill_save'],
        'corruptions_injected': len(outcomes),
        'corruptions_detected': outcomes.count('detected'),
        'corruptions_harmless_not_read': outcomes.count('harmless'),
        'corruptions_undetected_harmful': outcomes.count('undetected and harmful'),
        'corruptions_never_read': outcomes.count('never read'),
        'corruptions_accepted_not_judged': outcomes.count('accepted, not judged'),
        'corruptions_that_stopped_the_run': outcomes.count('stopped the run'),
        'detected_although_harmless': sum(
            1 for x in ledger.corruptions
            if x['outcome'] == 'detected' and x['independent']['verdict'] == 'same'),
        'by_file_kind': _by_kind(ledger.corruptions),
        'good_checkpoints_lost': len(ledger.lost),
        'false_alarms': len(ledger.false_alarms),
        'intact_checkpoints_modified': len(ledger.modified),
        'unexpected_exits': sum(not r['as_expected'] for r in self.runs),
        # The first step whose printed metrics differ from the reference's, run by run: where
        # a run stopped reproducing the uninterrupted one.
        'runs_diverging_from_reference': [
            {'run': r['run'], 'step': r['diverges_from_reference_at_step'],
             'start_step': r['start_step'], 'resumed_from': r['resumed_from'],
             'moved_aside': [u['moved_to'].rsplit('/', 1)[-1] for u in r['unreadable']]}
            for r in self.runs if r['diverges_from_reference_at_step'] is not None],
        'unexplained': ledger.unexplained,
        'bit_identical': comparison['bit_identical'],
        'arrays_compared': comparison['arrays'],
        'arrays_differing': comparison['differ'][:20],
        'reference_wall_s': reference['wall_s'],
        'wall_s': round(wall, 1),
    }
    summary['goal_met'] = bool(
        summary['bit_identical'] and summary['good_checkpoints_lost'] == 0 and
        summary['false_alarms'] == 0 and summary['corruptions_undetected_harmful'] == 0 and
        summary['corruptions_that_stopped_the_run'] == 0 and not ledger.unexplained and
        summary['corruptions_accepted_not_judged'] == 0 and
        summary['corruptions_detected'] + summary['corruptions_harmless_not_read'] ==
        summary['corruptions_injected'] and reference['as_expected'])
    return {'summary': summary, 'corruptions': ledger.corruptions, 'lost': ledger.lost,
            'false_alarms': ledger.false_alarms,
            'runs': [_public(r) for r in [reference] + self.runs],
            'events': self.events}


def _public(record: dict) -> dict:
  return {k: v for k, v in record.items() if not k.startswith('_')}


def _divergence(record: dict, reference: dict) -> int | None:
  for step, text in sorted(record['_metrics'].items()):
    if reference['_metrics'].get(step) != text:
      return step
  return None


def _first_divergence(diverging: list[dict]) -> str:
  if not diverging:
    return 'none'
  first = diverging[0]
  return (f'run{first["run"]} at step {first["step"]} (resumed from {first["resumed_from"]}, '
          f'moved aside {first["moved_aside"]}); {len(diverging)} run(s) in all')


def _by_kind(corruptions) -> dict[str, dict[str, int]]:
  table: dict[str, dict[str, int]] = {}
  for c in corruptions:
    row = table.setdefault(c['kind'], {})
    row[c['outcome']] = row.get(c['outcome'], 0) + 1
  return table


def print_summary(summary: dict, say=print) -> None:
  rows = [
      ('runs (restarts / resumes)', f'{summary["runs"]} ({summary["restarts"]} / '
                                    f'{summary["resumes"]})'),
      ('kills sent', ', '.join(f'{k} {v}' for k, v in summary['kills_sent'].items())),
      ('corruptions injected', summary['corruptions_injected']),
      ('  detected (moved aside)', summary['corruptions_detected']),
      ('  harmless (bytes not read)', summary['corruptions_harmless_not_read']),
      ('  undetected and harmful', summary['corruptions_undetected_harmful']),
      ('  never read by a later run', summary['corruptions_never_read']),
      ('  stopped the run', summary['corruptions_that_stopped_the_run']),
      ('  accepted, not judged', summary['corruptions_accepted_not_judged']),
      ('good checkpoints lost', summary['good_checkpoints_lost']),
      ('false alarms', summary['false_alarms']),
      ('final params + opt_state bit-identical', 'yes' if summary['bit_identical'] else 'NO'),
      ('first run diverging from the reference', _first_divergence(
          summary['runs_diverging_from_reference'])),
      ('goal met', 'yes' if summary['goal_met'] else 'NO'),
  ]
  width = max(len(r[0]) for r in rows)
  for name, value in rows:
    say(f'{name:<{width}}  {value}')


def main():
  defaults = Config()
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=defaults.steps)
  parser.add_argument('--checkpoint_every', type=int, default=defaults.checkpoint_every)
  parser.add_argument('--kills', type=int, default=defaults.kills)
  parser.add_argument('--corruptions', type=int, default=defaults.corruptions)
  parser.add_argument('--seed', type=int, default=defaults.seed)
  parser.add_argument('--model_dir', default=defaults.model_dir,
                      help='root for the reference and faulty runs (deleted and made anew)')
  parser.add_argument('--keep_checkpoints', type=int, default=None,
                      help='KEEP_CHECKPOINTS (default None: keep all, so none may disappear)')
  parser.add_argument('--kill_kinds', nargs='+', choices=kill_lib.KINDS,
                      default=list(kill_lib.KINDS))
  parser.add_argument('--gin_bindings', action='append', default=[],
                      help='extra gin binding for every run, e.g. "BATCH_SIZE = 8"')
  parser.add_argument('--save_kill_delay_s', type=float, default=None,
                      help='longest wait after a checkpoint step before a SIGKILL during its '
                      'save (default: the median save time seen)')
  parser.add_argument('--results_name', default='fault_injection',
                      help='writes benchmarks/results/<results_name>_<platform>.json')
  parser.add_argument('--parallel_reference', action='store_true',
                      help='run the reference beside the first faulty run (faster, but the two '
                      'share the CPU while kills are timed)')
  args = parser.parse_args()
  config = Config(steps=args.steps, checkpoint_every=args.checkpoint_every, kills=args.kills,
                  corruptions=args.corruptions, seed=args.seed, model_dir=args.model_dir,
                  keep_checkpoints=args.keep_checkpoints, kill_kinds=tuple(args.kill_kinds),
                  gin_bindings=tuple(args.gin_bindings),
                  parallel_reference=args.parallel_reference,
                  save_kill_delay_s=args.save_kill_delay_s)
  results = Benchmark(config).run()
  print_summary(results['summary'])
  from benchmarks import environment  # pylint: disable=g-import-not-at-top
  path = environment.write(args.results_name, dataclasses.asdict(config), results)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
