"""Prompts read from a task's split (run_mode=infer without a prompt file)."""

import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).parents[2]


def test_stopping_after_the_first_prompts_leaves_no_half_read_cache():
  """MAX_EXAMPLES stops the read early: with seqio's in-memory cache of small splits, TensorFlow
  printed "did not fully read the dataset being cached" (its C++ log, so a subprocess)."""
  code = textwrap.dedent("""
      import gc, seqio
      from efficientlm.data import prompts, tasks
      from efficientlm.data.config import DatasetConfig
      cfg = DatasetConfig('synthetic_recall', {'targets': 49}, split='validation', batch_size=8)
      read = prompts.task_prompts(cfg, prompt_length=20)
      first = next(read)
      del read
      gc.collect()
      ds = seqio.get_mixture_or_task('synthetic_recall').get_dataset(
          {'targets': 49}, split='validation', shuffle=False, try_in_mem_cache=False)
      expected = next(ds.as_numpy_iterator())['targets'][:20]
      assert first['prompt'].tolist() == [t for t in expected.tolist() if t > 0], first
      print('read one prompt')
  """)
  run = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=False)
  assert run.returncode == 0 and 'read one prompt' in run.stdout, run.stderr
  assert 'did not fully read the dataset' not in run.stderr, run.stderr
