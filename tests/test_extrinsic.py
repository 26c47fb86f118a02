"""Extrinsic enhancement: cleaning (resumable, one-to-one, source untouched), rounds, generation."""

import hashlib
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from idm_jax.data import sources
from idm_jax.extrinsic import cleaned_dataset
from idm_jax.extrinsic import cleaning
from idm_jax.extrinsic import rounds as rounds_lib
from idm_jax.metrics import niqe as niqe_lib
from idm_jax.storage import images


def tree_digest(root):
  h = hashlib.sha256()
  for d, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      p = os.path.join(d, f)
      h.update(os.path.relpath(p, root).encode())
      with open(p, 'rb') as fh:
        h.update(fh.read())
  return h.hexdigest()


@pytest.fixture
def faces(tmp_path, celeba_dir):
  """12 real faces in a folder of our own (the shared folder is read-only)."""
  src = tmp_path / 'faces'
  src.mkdir()
  for name in sorted(os.listdir(celeba_dir))[:12]:
    shutil.copy(celeba_dir / name, src / name)
  return src


class FakeRestorer:
  """Inverts images; raises after `fail_after` batches to simulate a killed run."""

  lockstep = False  # one process
  resolution = 32

  def __init__(self, fail_after=None):
    self.calls = 0
    self.fail_after = fail_after

  def restore(self, lq, **kwargs):
    if self.fail_after is not None and self.calls >= self.fail_after:
      raise KeyboardInterrupt('killed')
    self.calls += 1
    return 255 - lq


def clean_cfg(fraction=1.0, batch_size=2):
  import ml_collections

  return ml_collections.ConfigDict(
    dict(
      sampler='ddim',
      steps=2,
      t_start=0.5,
      samples=1,
      fraction=fraction,
      score='niqe',
      batch_size=batch_size,
      out_dir='',
    )
  )


class IndexRestorer:
  """Adds a draw's noise index (mod 7) to the face, and records every (seed, index) drawn."""

  def __init__(self):
    self.drawn = []

  def restore(self, lq, *, indices, seed, **settings):
    self.drawn += [(seed, int(i)) for i in indices]
    return (lq + (np.asarray(indices) % 7)[:, None, None, None]).astype(np.uint8)


def test_cleaning_with_several_samples_averages_independent_draws():
  lq = np.full((3, 4, 4, 3), 100, np.uint8)
  idx = np.array([5, 0, 9])
  one = IndexRestorer()
  np.testing.assert_array_equal(  # one sample is the plain restoration, same noise indices
    cleaning.restore_mean(one, idx, lq, samples=1, seed=3, steps=1),
    lq + (idx % 7)[:, None, None, None],
  )
  assert one.drawn == [(3, 5), (3, 0), (3, 9)]
  four = IndexRestorer()
  out = cleaning.restore_mean(four, idx, lq, samples=4, seed=3, steps=1)
  draws = [(idx * 4 + k) % 7 for k in range(4)]
  np.testing.assert_array_equal(out[:, 0, 0, 0], 100 + np.rint(np.mean(draws, axis=0)))
  assert len(four.drawn) == 12 and len(set(four.drawn)) == 12  # no two draws share noise


def test_killed_cleaning_resumes_to_exactly_one_record_each(faces, tmp_path):
  before = tree_digest(faces)
  source = sources.FolderSource(tuple(images.list_images(faces)), 32, root=str(faces))
  out = tmp_path / 'clean'
  kw = dict(clean_cfg=clean_cfg(), seed=0, niqe_params=None, resolution=32, provenance={})
  with pytest.raises(KeyboardInterrupt):
    cleaning.clean_dataset(source, FakeRestorer(fail_after=3), str(out), **kw)
  assert not (out / 'manifest.json').exists()
  # A line cut by the kill must not break the resume.
  with open(out / 'journal-0.jsonl', 'a') as f:
    f.write('{"name": "half')
  restorer = FakeRestorer()
  manifest = cleaning.clean_dataset(source, restorer, str(out), **kw)
  assert restorer.calls == 3  # 12 images in batches of 2: 6 batches, 3 done before the kill
  assert manifest['source_records'] == 12 and manifest['counts']['cleaned'] == 12
  assert cleaned_dataset.verify_manifest(str(out))['cleaned'] == 12
  assert sorted(os.listdir(out / 'images')) == sorted(
    os.path.splitext(n)[0] + '.png' for n in os.listdir(faces)
  )
  assert tree_digest(faces) == before
  # A tampered file is caught by the manifest check.
  victim = out / 'images' / sorted(os.listdir(out / 'images'))[0]
  victim.write_bytes(victim.read_bytes()[:-1] + b'x')
  with pytest.raises(RuntimeError, match='checksum'):
    cleaned_dataset.verify_manifest(str(out))


def test_lockstep_cleaning_agrees_once_per_job(faces, tmp_path, monkeypatch):
  """Over several processes the hosts agree once on how many batches to run, not once per
  batch (each agreement is a round trip through the coordination service)."""
  from idm_jax.runtime import parallel

  calls = []
  monkeypatch.setattr(parallel, 'max_over_processes', lambda n, **kw: calls.append(n) or n)
  restorer = FakeRestorer()
  restorer.lockstep = True
  source = sources.FolderSource(tuple(images.list_images(faces)), 32, root=str(faces))
  cleaning.clean_dataset(
    source,
    restorer,
    str(tmp_path / 'clean'),
    clean_cfg=clean_cfg(),
    seed=0,
    niqe_params=None,
    resolution=32,
    provenance={},
  )
  assert restorer.calls == 6 and calls == [6]  # 12 images in batches of 2


def test_selection_cleans_the_worst_and_copies_the_rest(faces, tmp_path, niqe_params_path):
  source = sources.FolderSource(tuple(images.list_images(faces)), 128, root=str(faces))
  out = tmp_path / 'clean'
  manifest = cleaning.clean_dataset(
    source,
    FakeRestorer(),
    str(out),
    clean_cfg=clean_cfg(fraction=0.25),
    seed=0,
    niqe_params=str(niqe_params_path),
    resolution=128,
    provenance={'model': 'fake'},
  )
  with open(out / 'scores.json') as f:
    scores = json.load(f)
  niqe = niqe_lib.load_niqe_params(str(niqe_params_path))
  worst = sorted(scores, key=lambda n: -scores[n])[:3]
  cleaned = sorted(r['name'] for r in manifest['records'] if r['action'] == 'cleaned')
  assert cleaned == sorted(worst)
  for r in manifest['records']:
    if r['action'] == 'copied':
      assert (out / 'images' / r['file']).read_bytes() == (faces / r['name']).read_bytes()
    else:
      img = np.asarray(Image.open(out / 'images' / r['file']))
      orig = sources.load_image(str(faces / r['name']), 128)
      np.testing.assert_array_equal(img, 255 - orig)
      assert r['score'] == scores[r['name']]
      assert r['score_after'] == pytest.approx(cleaning.niqe_of(img, niqe, 128))
  assert manifest['counts'] == {'cleaned': 3, 'copied': 9, 'failed': 0}
  after = [r['score_after'] for r in manifest['records'] if r['action'] == 'cleaned']
  assert manifest['cleaned_niqe'] == pytest.approx(
    {'before': np.mean([scores[n] for n in worst]), 'after': np.mean(after)}
  )


def test_select_worst_ties_and_failures():
  scores = {'a': 1.0, 'b': 5.0, 'c': 5.0, 'd': None, 'e': 2.0}
  assert cleaning.select_worst(scores, 0.5) == {'b', 'c'}
  assert cleaning.select_worst(scores, 0.0) == set()
  assert cleaning.select_worst(scores, 1.0) == {'a', 'b', 'c', 'e'}


def tiny(test_config, faces):
  c = test_config
  c.data.update(source='folder', dir=str(faces), num_val=4)
  c.train.update(num_steps=2, ckpt_every=2, sample_every=2)
  c.eval.update(num_images=4, steps=(2,), batch_size=4, identity=False)
  c.clean.update(steps=2, batch_size=4, fraction=1.0)
  c.extrinsic.update(rounds=2, init='finetune')
  return c


def test_two_rounds_end_to_end(faces, tmp_path, test_config, monkeypatch):
  from idm_jax.data import pipeline

  seen = []
  real = pipeline.train_iterator

  def spy(config, **kw):
    seen.append(config.data.dir)
    return real(config, **kw)

  monkeypatch.setattr(pipeline, 'train_iterator', spy)
  config = tiny(test_config, faces)
  before = tree_digest(faces)
  work = tmp_path / 'work'
  results = rounds_lib.run_rounds(config, str(work))
  assert set(results) == {'0', '1'}
  assert seen == [str(faces), str(work / 'round_1' / 'dataset' / 'images')]
  assert cleaned_dataset.verify_manifest(str(work / 'round_1' / 'dataset'))['cleaned'] == 8
  table = (work / 'rounds.md').read_text()
  assert '| 0 | source |' in table and '| 1 | round_1/dataset |' in table
  assert tree_digest(faces) == before
  # Running again resumes: nothing is retrained, re-cleaned or re-evaluated.
  seen.clear()
  assert rounds_lib.run_rounds(config, str(work)) == results


def test_a_stop_request_in_round_0_stops_the_rounds(faces, tmp_path, test_config, monkeypatch):
  """SIGTERM during round 0's training: the step is saved and nothing after it runs (no
  evaluation, no cleaning with the part-trained model, no round 1); the rerun finishes both
  rounds from the saved step."""
  import os
  import signal

  from idm_jax.runtime import parallel
  from idm_jax.training import train

  config = tiny(test_config, faces)
  config.train.update(num_steps=4, ckpt_every=4, sample_every=4)
  real, fetched = parallel.local_batch_to_global, []

  def signalling(*args, **kwargs):
    fetched.append(1)
    if len(fetched) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

  monkeypatch.setattr(parallel, 'local_batch_to_global', signalling)
  work = tmp_path / 'work'
  with pytest.raises(train.Stopped, match='step 2 after SIGTERM') as stop:
    rounds_lib.run_rounds(config, str(work))
  assert stop.value.step == 2
  assert sorted(p.name for p in (work / 'round_0').iterdir()) == [
    'checkpoints',
    'config.json',
    'metrics.jsonl',
    'tensorboard',
  ]
  assert (work / 'round_0' / 'checkpoints' / '2').is_dir()
  assert not (work / 'round_1').exists() and not (work / 'rounds.json').exists()

  monkeypatch.setattr(parallel, 'local_batch_to_global', real)
  results = rounds_lib.run_rounds(config, str(work))
  assert set(results) == {'0', '1'}
  assert (work / 'round_0' / 'checkpoints' / '4').is_dir()  # round 0 resumed to its end
  assert cleaned_dataset.verify_manifest(str(work / 'round_1' / 'dataset'))['cleaned'] == 8


def test_unconditional_training_and_generation(local_or_bucket, test_config):
  """The "beyond" generator, its workdir on local disk or in a bucket; a rerun with more samples
  only draws the missing ones."""
  from idm_jax.inference import generate
  from idm_jax.storage import files
  from idm_jax.training import train

  workdir = files.join(local_or_bucket, 'gen')
  c = test_config
  c.model.update(conditional=False, lq_concat=False, lq_encoder=False)
  c.train.update(num_steps=2, ckpt_every=2, sample_every=2)
  c.generate.update(num_samples=5, batch_size=4)
  train.train_and_evaluate(c, workdir)
  out = generate.run(c, workdir)
  names = files.listdir(out)
  assert names == [f'{i:06d}.png' for i in range(5)]
  pngs = [images.read(files.join(out, f)) for f in names]
  assert all(im.shape == (32, 32, 3) for im in pngs)
  assert len({im.tobytes() for im in pngs}) == 5
  assert 'generated_grid.png' in files.listdir(workdir)
  c.generate.num_samples = 6
  generate.run(c, workdir)
  assert files.listdir(out)[-1] == '000005.png'
  assert [images.read(files.join(out, f)).tobytes() for f in names] == [p.tobytes() for p in pngs]


def test_cleaning_a_non_folder_source_writes_every_record(tmp_path):
  """Sources that are not folders (builtin here, TFDS alike) are re-encoded losslessly as PNG."""
  source = sources.BuiltinSource('validation', 32)
  manifest = cleaning.clean_dataset(
    source,
    FakeRestorer(),
    str(tmp_path / 'c'),
    clean_cfg=clean_cfg(fraction=1.0),
    seed=0,
    niqe_params=None,
    resolution=32,
    provenance={},
  )
  written = [f for _, _, fs in os.walk(tmp_path / 'c' / 'images') for f in fs]
  assert manifest['counts']['cleaned'] == len(source) == len(written)
  rec = source[0]
  img = np.asarray(
    Image.open(tmp_path / 'c' / 'images' / (os.path.splitext(rec['name'])[0] + '.png'))
  )
  np.testing.assert_array_equal(img, 255 - rec['image'])


def test_extrinsic_mode_on_a_folder_without_niqe_file_ranks_with_shipped_params(
  tmp_path, test_config
):
  """The README's `--config.mode=extrinsic --config.data.dir=MY_FACES` on a user's folder: the
  default clean.fraction (< 1) ranks images by NIQE, with the parameters the package ships."""
  from idm_jax import main

  faces = tmp_path / 'my_faces'  # nothing beside it: no niqe_pris_params.npz
  faces.mkdir()
  for i in range(16):
    Image.fromarray(sources.BuiltinSource('train', 64)[i]['image']).save(faces / f'{i:02d}.png')
  config = tiny(test_config, faces)
  config.clean.fraction = 0.25  # 12 training images: the worst 3 are cleaned
  config.mode = 'extrinsic'
  work = tmp_path / 'work'
  main.run(config, str(work))
  dataset = work / 'round_1' / 'dataset'
  scores = json.loads((dataset / 'scores.json').read_text())
  assert len(scores) == 12 and all(s is not None and s > 0 for s in scores.values())
  assert cleaned_dataset.verify_manifest(str(dataset)) == {'cleaned': 3, 'copied': 9, 'failed': 0}
  # Validation reports NIQE for every round with the same parameters.
  rounds = json.loads((work / 'rounds.json').read_text())
  assert all(rounds[r]['metrics']['niqe'] is not None for r in ('0', '1'))


def test_selection_by_artifacts_score_finds_the_defective_faces(faces, tmp_path):
  """clean.score='artifacts' on real faces, two of them blurred: those two are the ones cleaned."""
  from idm_jax.data import contaminate

  names = sorted(os.listdir(faces))
  for name in names[3], names[8]:
    img = sources.load_image(str(faces / name), 64)
    Image.fromarray(contaminate.apply_defect(img, dict(kind='blur', sigma=1.5))).save(faces / name)
  source = sources.FolderSource(tuple(images.list_images(faces)), 64, root=str(faces))
  cfg = clean_cfg(fraction=2 / 12)
  cfg.score = 'artifacts'
  # The artifacts score needs no NIQE parameters: a missing file is never opened.
  manifest = cleaning.clean_dataset(
    source,
    FakeRestorer(),
    str(tmp_path / 'clean'),
    clean_cfg=cfg,
    seed=0,
    niqe_params=str(tmp_path / 'none.npz'),
    resolution=64,
    provenance={},
  )
  cleaned = sorted(r['name'] for r in manifest['records'] if r['action'] == 'cleaned')
  assert cleaned == [names[3], names[8]]
  assert 'cleaned_niqe' not in manifest  # score_after is NIQE's; not mixed with another score
  # The scores are kept beside the dataset, as NIQE's are, so the selection can be inspected.
  scores = json.loads((tmp_path / 'clean' / cleaned_dataset.SCORES).read_text())
  assert set(sorted(scores, key=lambda n: -scores[n])[:2]) == {names[3], names[8]}
  assert {r['name']: r['score'] for r in manifest['records']} == scores
  cfg.score = 'brisque'
  with pytest.raises(ValueError, match='clean.score'):
    cleaning.clean_dataset(
      source,
      FakeRestorer(),
      str(tmp_path / 'other'),
      clean_cfg=cfg,
      seed=0,
      niqe_params=None,
      resolution=64,
      provenance={},
    )


def test_two_rounds_with_the_workdir_in_a_bucket(tmp_path, test_config, gcs_bucket):
  """The rounds with every dataset version in gs://: round 1 trains on images it reads back
  from the bucket, and a rerun resumes without redoing anything."""
  from idm_jax.storage import files

  faces = tmp_path / 'faces'
  faces.mkdir()
  for i in range(12):
    Image.fromarray(sources.BuiltinSource('train', 64)[i]['image']).save(faces / f'{i:02d}.png')
  config = tiny(test_config, faces)
  work = f'{gcs_bucket}/work'
  results = rounds_lib.run_rounds(config, work)
  assert set(results) == {'0', '1'}
  assert cleaned_dataset.verify_manifest(f'{work}/round_1/dataset')['cleaned'] == 8
  listing = files.walk_files(work)
  assert 'rounds.md' in listing and 'round_1/checkpoints/2/ema/_METADATA' in listing
  assert sum(n.startswith('round_1/dataset/images/') for n in listing) == 8
  assert rounds_lib.run_rounds(config, work) == results


def test_cleaning_refuses_an_output_inside_its_source_folder(tmp_path, test_config):
  """The source is never written to: clean.out_dir inside data.dir (locally through a symlink
  too, or in a bucket) is refused before any model loads."""
  c = test_config
  (tmp_path / 'src').mkdir()
  (tmp_path / 'link').symlink_to(tmp_path / 'src')
  for src, out in (
    (tmp_path / 'src', tmp_path / 'link' / 'cleaned'),
    ('gs://b/faces', 'gs://b/faces/cleaned'),
    ('gs://b/faces', 'gs://b/faces'),
  ):
    c.data.update(source='folder', dir=str(src))
    c.clean.out_dir = str(out)
    with pytest.raises(ValueError, match='is inside the source folder'):
      cleaning.clean_from_config(c, str(tmp_path / 'work'))
  c.clean.out_dir = 'gs://b/faces_cleaned'  # a sibling whose name starts alike is not inside
  cleaning._refuse_inside_source(c, c.clean.out_dir)
