"""CLI: a folder of face images -> a TFDS dataset (array_record) at one resolution.

  python -m idm_jax.data.prepare --src ~/ffhq/images1024x1024 --name ffhq512 --resolution 512 \
      --out ~/tensorflow_datasets

writes OUT/idm_faces/ffhq512/1.0.0/, which training reads with
  --config.data.source=tfds --config.data.tfds_name=idm_faces/ffhq512 \
  --config.data.tfds_data_dir=OUT
(tfds_name='ffhq512' works too). Records: {'image': RxR PNG in tfds's Image feature (so
`tfds.data_source` returns uint8 arrays), 'name': the file's path relative to --src}. The
train/validation split is decided by a hash of that relative name, so it is stable when files
are added, removed or listed in another order.

No TensorFlow needed: TFDS's Image feature needs TF only to *encode* arrays; we hand it PNG
bytes we encoded ourselves (Pillow), and TFDS decodes with OpenCV on read.

Bad files are skipped, each logged with its name and reason, and counted in the summary. The
dataset is built in a temporary folder next to the destination and moved into place only when
complete; an existing complete dataset is left alone unless --overwrite.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Iterator, Sequence

from absl import logging
import tqdm

from idm_jax.data import sources
from idm_jax.runtime import cli
from idm_jax.storage import files
from idm_jax.storage import images

VERSION = '1.0.0'


def assign_split(rel_name: str, val_fraction: float) -> str:
  return 'validation' if sources.stable_fraction(rel_name) < val_fraction else 'train'


def dataset_dir(out: str | os.PathLike, name: str) -> str:
  """OUT/idm_faces/NAME: the folder holding the version subfolder (local or gs://)."""
  return files.join(out, sources.TFDS_BUILDER_NAME, name)


def is_complete(out: str | os.PathLike, name: str) -> bool:
  # tfds writes dataset_info.json last, and we only move (or upload) finished builds into place.
  return files.isfile(files.join(dataset_dir(out, name), VERSION, 'dataset_info.json'))


def _encode_one(path: str, rel: str, resolution: int) -> tuple[str, bytes | None, str]:
  """(rel, png bytes or None, reason). Module level so spawned workers can import it."""
  try:
    return rel, sources.encode_png(sources.load_image(path, resolution, rel)), ''
  except images.BadImage as e:
    return rel, None, e.reason


def _make_builder_class():
  """The builder class, created lazily so importing this module does not import tfds."""
  import tensorflow_datasets as tfds  # noqa: PLC0415 (keeps --help fast: tfds is heavy)

  # skip_registration: readers must open prepared data from its files, never from this class
  # (whose configs exist only at prepare time).
  class IdmFaces(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Face images at one resolution, PNG-encoded; one BuilderConfig per prepared dataset."""

    name = sources.TFDS_BUILDER_NAME
    VERSION = tfds.core.Version(VERSION)

    # No code folder with checksums.tsv / metadata beside us. Returning None also avoids a
    # tfds 4.9.10 code path that imports the undeclared `importlib_resources` package.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      return None

    def __init__(
      self, *, files: dict[str, list[tuple[str, str]]], resolution: int, workers: int, **kwargs
    ):
      self._files, self._resolution, self._workers = files, resolution, workers
      self.bad: list[tuple[str, str]] = []
      self.progress = None
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        description=(
          f'Face images centre-cropped and resized to {self._resolution}x'
          f'{self._resolution} (antialiased), PNG-encoded; made by '
          'idm_jax.data.prepare.'
        ),
        features=tfds.features.FeaturesDict(
          {
            # Given PNG bytes, the Image feature stores them as they are (encoding would
            # need TF); readers get uint8 arrays back, decoded by OpenCV.
            'image': tfds.features.Image(
              shape=(self._resolution, self._resolution, 3), encoding_format='png'
            ),
            'name': tfds.features.Text(),
          }
        ),
        metadata=tfds.core.MetadataDict(resolution=self._resolution),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(files) for split, files in self._files.items()}

    def _generate_examples(self, files):
      for rel, png, reason in _encode_all(files, self._resolution, self._workers):
        if self.progress is not None:
          self.progress.update(1)
        if png is None:
          logging.warning('skipping bad file %s: %s', rel, reason)
          self.bad.append((rel, reason))
          continue
        yield rel, {'image': png, 'name': rel}

  return IdmFaces


def _encode_all(
  files: Sequence[tuple[str, str]], resolution: int, workers: int
) -> Iterator[tuple[str, bytes | None, str]]:
  if workers <= 1:
    yield from (_encode_one(path, rel, resolution) for path, rel in files)
    return
  # spawn: tfds/absl state in this process must not be forked into workers.
  with multiprocessing.get_context('spawn').Pool(workers) as pool:
    # imap keeps the file order, so the build is identical for any worker count.
    yield from pool.imap(_star_encode, [(p, r, resolution) for p, r in files], chunksize=8)


def _star_encode(args: tuple[str, str, int]) -> tuple[str, bytes | None, str]:
  return _encode_one(*args)


def prepare(
  src: str,
  name: str,
  resolution: int,
  out: str,
  val_fraction: float = 0.05,
  overwrite: bool = False,
  workers: int = 0,
) -> dict:
  """Builds OUT/idm_faces/NAME; returns a summary dict (counts, bad files, seconds, path)."""
  import tensorflow_datasets as tfds  # noqa: PLC0415 (keeps --help fast: tfds is heavy)

  if not name or '/' in name or not name.replace('_', '').replace('-', '').isalnum():
    raise ValueError(f'--name {name!r}: use letters, digits, _ and - only (e.g. ffhq512)')
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'--val_fraction {val_fraction} must be in [0, 1)')
  final = dataset_dir(out, name)
  if is_complete(out, name) and not overwrite:
    logging.info('%s is already complete; leaving it alone (pass --overwrite to rebuild)', final)
    return {'path': str(final), 'skipped_existing': True}
  if files.is_remote(src):
    raise ValueError(
      f'--src {src}: a local folder (copy the images down first, e.g. gcloud '
      'storage rsync -r SRC DIR); --out may be gs://'
    )
  if files.is_remote(out):
    return _prepare_and_upload(src, name, resolution, out, val_fraction, workers)

  root = pathlib.Path(src).expanduser()
  paths = images.list_images(root)
  splits: dict[str, list[tuple[str, str]]] = {'train': [], 'validation': []}
  for p in paths:
    rel = pathlib.Path(p).relative_to(root).as_posix()
    splits[assign_split(rel, val_fraction)].append((p, rel))
  if not splits['validation']:
    logging.warning(
      'no file fell into the validation split (val_fraction=%s); train only', val_fraction
    )
    del splits['validation']

  t0 = time.time()
  pathlib.Path(out).mkdir(parents=True, exist_ok=True)
  tmp_dir = pathlib.Path(out) / f'.prepare-{name}-{os.getpid()}'
  shutil.rmtree(tmp_dir, ignore_errors=True)
  builder = _make_builder_class()(
    files=splits,
    resolution=resolution,
    workers=workers,
    data_dir=str(tmp_dir),
    config=tfds.core.BuilderConfig(
      name=name, version=VERSION, description=f'{root} at {resolution} px'
    ),
  )
  builder.progress = tqdm.tqdm(total=len(paths), desc=f'prepare {name}', unit='img')
  try:
    builder.download_and_prepare(
      download_dir=str(tmp_dir / 'downloads'),
      download_config=tfds.download.DownloadConfig(try_download_gcs=False),
      file_format='array_record',
    )
    builder.progress.close()
    # Swap into place: old -> backup, new -> final, drop backup. A crash in between leaves
    # either the old or the new dataset complete, never a half-written one under the final name.
    built = pathlib.Path(dataset_dir(tmp_dir, name))
    final = pathlib.Path(final)
    backup = tmp_dir / 'previous'
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
      final.rename(backup)
    try:
      built.rename(final)
    except OSError:
      if backup.exists():
        backup.rename(final)
      raise
  finally:
    builder.progress.close()
    shutil.rmtree(tmp_dir, ignore_errors=True)

  bad_names = {rel for rel, _ in builder.bad}
  return {
    'path': str(final),
    'tfds_name': f'{sources.TFDS_BUILDER_NAME}/{name}',
    'examples': {s: sum(rel not in bad_names for _, rel in f) for s, f in splits.items()},
    'bad': builder.bad,
    'seconds': time.time() - t0,
    'skipped_existing': False,
  }


def _prepare_and_upload(
  src: str, name: str, resolution: int, out: str, val_fraction: float, workers: int
) -> dict:
  """A bucket --out: builds in a local temporary folder, then uploads. The old version's objects
  go first and dataset_info.json comes last, so a reader (and is_complete) never takes a
  half-uploaded dataset for a finished one."""
  final = dataset_dir(out, name)
  with tempfile.TemporaryDirectory(prefix='idm_jax_prepare_') as local:
    summary = prepare(src, name, resolution, local, val_fraction, False, workers)
    built = dataset_dir(local, name)
    if files.isdir(final):
      for rel in files.walk_files(final):
        files.remove(files.join(final, rel))
    rels = sorted(files.walk_files(built), key=lambda r: r.endswith('dataset_info.json'))
    for rel in tqdm.tqdm(rels, desc=f'upload to {final}', unit='file'):
      files.copy_file(files.join(built, rel), files.join(final, rel))
  return dict(summary, path=final)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  p = cli.ArgumentParser(
    prog='python -m idm_jax.data.prepare',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument('--src', required=True, help='folder of face images (searched recursively)')
  p.add_argument('--name', required=True, help='dataset name, e.g. ffhq512 -> idm_faces/ffhq512')
  p.add_argument('--resolution', type=int, required=True)
  p.add_argument('--out', required=True, help='TFDS data_dir to write into')
  p.add_argument('--val_fraction', type=float, default=0.05)
  p.add_argument('--overwrite', action='store_true', help='rebuild an existing dataset')
  p.add_argument(
    '--workers',
    type=int,
    default=min(8, os.cpu_count() or 1),
    help='decode/resize/encode processes (0 or 1: in this process)',
  )
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit status (0 ok, 1 bad input, 2 nothing usable)."""
  logging.set_verbosity(logging.INFO)
  args = _parse(sys.argv[1:] if argv is None else argv)
  try:
    summary = prepare(
      args.src,
      args.name,
      args.resolution,
      args.out,
      args.val_fraction,
      args.overwrite,
      args.workers,
    )
  except (FileNotFoundError, ValueError) as e:
    logging.error('%s', e)
    return 1
  if summary['skipped_existing']:
    print(f'{summary["path"]} exists; nothing to do (use --overwrite to rebuild).')
    return 0
  ex, bad = summary['examples'], summary['bad']
  print(f'\nWrote {summary["path"]} in {summary["seconds"]:.1f} s')
  print('  ' + ', '.join(f'{s}: {n} images' for s, n in ex.items()) + f', skipped: {len(bad)}')
  for rel, reason in bad[:20]:
    print(f'  skipped {rel}: {reason}')
  if len(bad) > 20:
    print(f'  ... and {len(bad) - 20} more (see the warnings above)')
  print(
    f'Train with: --config.data.source=tfds --config.data.tfds_name={summary["tfds_name"]} '
    f'--config.data.tfds_data_dir={args.out} --config.data.resolution={args.resolution}'
  )
  return 0 if ex.get('train', 0) > 0 else 2


if __name__ == '__main__':
  sys.exit(main())
