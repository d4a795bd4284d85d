"""The README's Python example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / 'README.md'


def test_readme_model_example_runs():
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), re.S)
  example = next(b for b in blocks if 'gin_config.parse' in b)
  namespace = {}
  exec(compile(example, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['logits'].shape == (8, 16, 32128)
  assert float(namespace['metrics']['num_tokens']) == 0.0  # dummy batch: all padding


def test_readme_kernel_example_runs():
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), re.S)
  example = next(b for b in blocks if 'bigbird_block_mask' in b)
  namespace = {}
  exec(compile(example, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  for name in ('out', 'local', 'bigbird'):
    assert namespace[name].shape == (2, 1000, 8, 64), name
  assert namespace['step'].shape == (2, 8, 64)
