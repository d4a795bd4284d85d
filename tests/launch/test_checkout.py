"""The packed checkout holds what git would commit: tracked and untracked, not ignored."""

from __future__ import annotations

import shutil
import subprocess
import tarfile

import pytest

from efficientlm.launch import checkout


@pytest.mark.skipif(shutil.which('git') is None, reason='needs git')
def test_pack(tmp_path):
  repo = tmp_path / 'repo'
  (repo / 'configs').mkdir(parents=True)
  (repo / 'setup.py').write_text('')
  (repo / 'configs' / 'a.gin').write_text('')
  (repo / '.gitignore').write_text('build/\n.venv/\n')
  (repo / '.venv').mkdir()
  (repo / '.venv' / 'big').write_text('')
  (repo / 'gone.py').write_text('')
  subprocess.run(['git', 'init', '-q', str(repo)], check=True)
  subprocess.run(['git', '-C', str(repo), 'add', 'setup.py', 'gone.py'], check=True)
  (repo / 'gone.py').unlink()  # tracked but deleted: skipped
  archive = checkout.archive_path(repo, 'job')
  assert checkout.pack(repo, archive) == 3
  with tarfile.open(archive) as tar:
    assert sorted(tar.getnames()) == ['.gitignore', 'configs/a.gin', 'setup.py']
