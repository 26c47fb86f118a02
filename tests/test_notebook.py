"""launch/colab_tpu.ipynb run as a user runs it: every cell in order on a Jupyter kernel.

On the CPU, pointed at this checkout instead of a clone (INSTALL=False: no clone, no pip install,
the two steps that need the network), with paths under tmp_path and a few training steps; the
parameters go in as papermill puts them, in a cell after the one tagged `parameters`.
"""

import json
import os
import re
import sys

from conftest import REPO
import pytest

nbformat = pytest.importorskip('nbformat', reason='needs the [test] extra (nbclient, ipykernel)')
nbclient = pytest.importorskip('nbclient', reason='needs the [test] extra (nbclient, ipykernel)')
pytest.importorskip('ipykernel', reason='needs the [test] extra (nbclient, ipykernel)')

NOTEBOOK = REPO / 'launch' / 'colab_tpu.ipynb'
KERNEL = 'idm_jax_test'


def _with_parameters(nb, params):
  """Papermill's injection: a cell right after the `parameters` cell that overrides its values."""
  tagged = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, 'the notebook needs exactly one cell tagged "parameters"'
  source = '\n'.join(f'{name} = {value!r}' for name, value in params.items())
  nb.cells.insert(
    tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={'tags': ['injected-parameters']})
  )
  return nb


def _run_notebook(tmp_path, monkeypatch, **params):
  """Executes the notebook; returns (the executed notebook, the error or None, the out dir)."""
  # A kernel on this very interpreter, and its bin/ first on PATH so that the notebook's
  # `python -m ...` commands run in this environment, as `python` does on Colab.
  jupyter = tmp_path / 'jupyter'
  spec = jupyter / 'kernels' / KERNEL
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(
    json.dumps(
      {
        'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
        'display_name': 'idm_jax tests',
        'language': 'python',
      }
    )
  )
  monkeypatch.setenv('JUPYTER_PATH', str(jupyter))
  monkeypatch.setenv('JUPYTER_RUNTIME_DIR', str(jupyter / 'runtime'))
  monkeypatch.setenv('PATH', os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
  out = tmp_path / 'content'
  out.mkdir()
  params = dict(
    INSTALL=False,
    REPO_DIR=str(REPO),
    OUT_DIR=str(out),
    WORKDIR=str(out / 'workdirs' / 'demo'),
    TENSORBOARD=False,
    **params,
  )
  nb = _with_parameters(nbformat.read(NOTEBOOK, as_version=4), params)
  client = nbclient.NotebookClient(
    nb, kernel_name=KERNEL, timeout=600, resources={'metadata': {'path': str(tmp_path)}}
  )
  error = None
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    error = e
  nbformat.write(nb, tmp_path / 'executed.ipynb')  # to read when a test fails
  return nb, error, out


def _text(cell):
  return ''.join(o.get('text', '') for o in cell.get('outputs', []) if o.output_type == 'stream')


@pytest.mark.slow
def test_notebook_runs_end_to_end_on_the_cpu(tmp_path, monkeypatch):
  nb, error, out = _run_notebook(tmp_path, monkeypatch, NUM_STEPS=4)
  assert error is None, str(error)[-4000:]
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.execution_count is not None for c in code)  # every cell ran
  # Each command's output is shown once, as it came, not again as a cell's value.
  assert not [o for c in code for o in c.outputs if o.output_type == 'execute_result']
  workdir = out / 'workdirs' / 'demo'
  # The two grids (sample_every = NUM_STEPS // 2), the final checkpoint, a test set and its
  # restorations, where the notebook says they are.
  assert sorted(p.name for p in workdir.glob('samples_*.png')) == [
    'samples_0000002.png',
    'samples_0000004.png',
  ]
  assert (workdir / 'checkpoints' / '4').is_dir()
  lq = sorted((out / 'testset' / 'lq').iterdir())
  assert lq
  cmp = sorted((out / 'results' / 'cmp').glob('*.png'))
  restored = sorted((out / 'results' / 'restored_faces').glob('*.png'))
  assert len(cmp) == len(restored) == len(lq)
  # The grid and the comparisons are shown, and the last code cell lists what was made.
  images = [c for c in code for o in c.outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 2
  summary = _text(code[-1])
  for line in ('checkpoints', 'sample grids', 'test set LQ faces', 'comparisons'):
    assert line in summary, summary
  assert re.search(r'^comparisons +(\d+) ', summary, re.M).group(1) == str(len(cmp)), summary
  assert not (tmp_path / 'content' / 'idm_jax').exists()  # nothing was cloned


def test_a_failing_step_stops_the_notebook(tmp_path, monkeypatch):
  """A bad training flag: the training cell raises, with the driver's own error shown, and no
  cell after it runs (a `!` line's failure went unnoticed, and the notebook 'succeeded')."""
  nb, error, out = _run_notebook(
    tmp_path, monkeypatch, NUM_STEPS=4, EXTRA_TRAIN_FLAGS='--config.train.no_such_field=1'
  )
  assert error is not None, 'the notebook ran on past a failed training command'
  message = str(error)
  assert 'StepFailed' in message and 'python -m idm_jax.main' in message, message[-3000:]
  code = [c for c in nb.cells if c.cell_type == 'code']
  train = next(i for i, c in enumerate(code) if '-m idm_jax.main' in c.source)
  assert code[train].execution_count is not None
  errors = [o for o in code[train].outputs if o.output_type == 'error']
  assert errors and errors[0].ename == 'StepFailed'
  # The driver's own error, in the cell's output below the command's echo line.
  echo, shown = _text(code[train]).split('\n', 1)
  assert echo.startswith('$ python -m idm_jax.main') and 'no_such_field' in shown, shown[-3000:]
  assert all(c.execution_count is None for c in code[train + 1 :])
  assert not (out / 'workdirs' / 'demo' / 'checkpoints').exists()
  assert not (out / 'testset').exists()
