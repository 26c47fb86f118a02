r"""A copy of an image folder in which a seeded, recorded share of the images is made "not truly HQ".

  python -m idm_jax.data.contaminate --src faces/ --dst contaminated/ --fraction 0.15 --seed 0 \
      [--resolution 64] [--skip_last 100] [--kinds blur,resize,jpeg,noise] [--blur-sigma 0.6 1.2]
  python -m idm_jax.data.contaminate --replay contaminated/manifest.json --dst again/

FFHQ's images that are not truly high quality cannot be identified, but they can be simulated:
this gives the extrinsic experiment the ground truth to score cleaning against. Every image is
loaded by the one training decoder (`sources.load_image`: EXIF, alpha, 16-bit, centre crop) at
`--resolution`, so a defect is applied at the size the model trains on (a mild blur at 128 px
all but vanishes after a 2x downsample). A chosen image gets one defect, drawn uniformly from
`--kinds` with its strength uniform in its range:
  blur    isotropic Gaussian, sigma in pixels
  resize  area downsample by a factor, bilinear back up (lost detail, soft edges)
  jpeg    libjpeg at a quality (blocking, ringing)
  noise   Gaussian sensor noise, sigma in 0..255 levels
Every output (contaminated or not) is a PNG at `--resolution` under DST/images/, so the pristine
copy made with --fraction 0 differs from the contaminated one exactly in the chosen images.
DST/manifest.json (written last) names each file, whether and how it was contaminated, and its
checksum; `--replay` re-creates the dataset byte for byte from it. The source is never written.
--src, --dst and --replay may be local or in a bucket (gs://...).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

from idm_jax.data import degradations
from idm_jax.data import sources
from idm_jax.runtime import cli
from idm_jax.storage import files
from idm_jax.storage import images

FORMAT = 'idm_jax/contaminated-dataset/1'
MANIFEST = 'manifest.json'
IMAGES = 'images'
KINDS = ('blur', 'resize', 'jpeg', 'noise')
# Mild defects at the training resolution: visible side by side, not at a glance.
DEFAULT_RANGES = dict(blur=(0.6, 1.2), resize=(1.5, 2.5), jpeg=(30, 60), noise=(3.0, 8.0))


class ContaminateError(ValueError):
  """Bad arguments or an unusable folder; the message says which."""


def choose(num_eligible: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of the round(fraction * n) eligible images to contaminate."""
  k = int(round(fraction * num_eligible))
  rng = np.random.default_rng([seed, 0])
  return np.sort(rng.choice(num_eligible, size=k, replace=False)) if k else np.zeros(0, int)


def sample_defect(seed: int, index: int, kinds: Sequence[str], ranges: dict) -> dict:
  """One defect for image `index`: its kind and strength, from (seed, index) alone."""
  rng = np.random.default_rng([seed, 1, index])
  kind = kinds[int(rng.integers(len(kinds)))]
  lo, hi = ranges[kind]
  if kind == 'jpeg':
    return dict(kind=kind, quality=int(rng.integers(int(lo), int(hi) + 1)))
  value = float(rng.uniform(lo, hi))
  key = dict(blur='sigma', resize='factor', noise='sigma')[kind]
  defect = {'kind': kind, key: value}
  if kind == 'noise':
    defect['noise_seed'] = int(rng.integers(2**31))
  return defect


def apply_defect(img: np.ndarray, defect: dict) -> np.ndarray:
  """uint8 (H, W, 3) -> uint8, the same size; deterministic given the defect's fields."""
  kind = defect['kind']
  h, w = img.shape[:2]
  x = img.astype(np.float32) / np.float32(255)
  if kind == 'blur':
    size = 2 * int(np.ceil(3 * defect['sigma'])) + 1
    g = degradations.gaussian_1d(defect['sigma'], size).astype(np.float32)
    x = cv2.sepFilter2D(x, -1, g, g, borderType=cv2.BORDER_REFLECT_101)
  elif kind == 'resize':
    small = (max(1, int(round(w / defect['factor']))), max(1, int(round(h / defect['factor']))))
    x = cv2.resize(
      cv2.resize(x, small, interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_LINEAR
    )
  elif kind == 'jpeg':
    x = degradations._jpeg(x, defect['quality'])  # pylint: disable=protected-access
  elif kind == 'noise':
    rng = np.random.default_rng(defect['noise_seed'])
    x = x + rng.normal(0.0, defect['sigma'] / 255.0, x.shape).astype(np.float32)
  else:
    raise ContaminateError(f'unknown defect kind {kind!r}; choose from {KINDS}')
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def plan(
  src: str,
  *,
  fraction: float,
  seed: int,
  resolution: int,
  skip_last: int,
  kinds: Sequence[str],
  ranges: dict,
) -> dict:
  """The manifest without checksums: which file gets which defect. Checks the arguments."""
  if not 0.0 <= fraction <= 1.0:
    raise ContaminateError(f'--fraction {fraction} must be in [0, 1]')
  bad = [k for k in kinds if k not in KINDS]
  if bad or not kinds:
    raise ContaminateError(f'--kinds {",".join(kinds)}: choose one or more of {",".join(KINDS)}')
  for k, (lo, hi) in ranges.items():
    if not 0 < lo <= hi:
      raise ContaminateError(
        f'--{k.replace("_", "-")} range ({lo}, {hi}) must have 0 < low <= high'
      )
  if resolution < 8:
    raise ContaminateError(f'--resolution {resolution} must be at least 8')
  paths = images.list_images(src)
  names = [files.relpath(p, src) for p in paths]
  if not 0 <= skip_last < len(names):
    raise ContaminateError(f'--skip_last {skip_last} must leave some of the {len(names)} images')
  eligible = len(names) - skip_last
  chosen = set(choose(eligible, fraction, seed).tolist())
  records = []
  for i, name in enumerate(names):
    rec = dict(name=name, file=os.path.splitext(name)[0] + '.png')
    if i in chosen:
      rec['defect'] = sample_defect(seed, i, kinds, ranges)
    records.append(rec)
  return dict(
    format=FORMAT,
    src=files.absolute(src),
    fraction=fraction,
    seed=seed,
    resolution=resolution,
    skip_last=skip_last,
    kinds=list(kinds),
    ranges={k: list(v) for k, v in ranges.items()},
    num_contaminated=len(chosen),
    records=records,
  )


def _check_dst(src: str, dst: str) -> None:
  if files.is_within(dst, src):
    raise ContaminateError(f'--dst {dst!r} is inside --src {src!r}; the source is never written')
  if files.is_within(src, dst):
    raise ContaminateError(f'--src {src!r} is inside --dst {dst!r}; choose another --dst')


def build(manifest: dict, dst: str, progress: bool = True) -> dict:
  """Writes the images the manifest describes into dst/images and the manifest (with
  checksums) last. Resumes: a finished dataset is verified, not rebuilt; a file already written
  is kept when it decodes to the same bytes a rebuild would write."""
  src = manifest['src']
  _check_dst(src, dst)
  done_path = files.join(dst, MANIFEST)
  if files.exists(done_path):
    old = json.loads(files.read_text(done_path))
    if {k: v for k, v in old.items() if k != 'records'} != {
      k: v for k, v in manifest.items() if k != 'records'
    } or [{k: v for k, v in r.items() if k != 'sha256'} for r in old['records']] != manifest[
      'records'
    ]:
      raise ContaminateError(
        f'{done_path} describes a different contamination; choose an empty '
        '--dst (nothing is overwritten)'
      )
    verify(dst)
    return old
  records = []
  for rec in tqdm(manifest['records'], desc='contaminate', disable=not progress, leave=False):
    path = files.join(src, rec['name'])
    try:
      img = sources.load_image(path, int(manifest['resolution']), rec['name'])
    except images.BadImage as e:
      raise ContaminateError(f'{path}: {e.reason}') from e
    if 'defect' in rec:
      img = apply_defect(img, rec['defect'])
    png = sources.encode_png(img)
    files.write_atomic(files.join(dst, IMAGES, rec['file']), png)
    records.append(dict(rec, sha256=_sha256(png)))  # the bytes written: no download to hash
  full = dict(manifest, records=records)
  files.write_atomic(done_path, json.dumps(full, indent=1).encode())
  return full


def verify(dst: str) -> dict:
  """Checks every file of a finished dataset against its manifest's checksum."""
  manifest = json.loads(files.read_text(files.join(dst, MANIFEST)))
  for rec in manifest['records']:
    path = files.join(dst, IMAGES, rec['file'])
    try:
      data = files.read_bytes(path)
    except OSError:  # missing, or a folder where the file should be
      data = None
    if data is None or _sha256(data) != rec['sha256']:
      raise ContaminateError(f'{path}: missing or its checksum differs from {MANIFEST}')
  return manifest


def contaminated_names(manifest: dict) -> set[str]:
  """The output file names (relative to images/) that carry a defect."""
  return {r['file'] for r in manifest['records'] if 'defect' in r}


def parse_args(argv):
  p = cli.ArgumentParser(
    prog='python -m idm_jax.data.contaminate',
    description=__doc__.split('\n\n')[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument('--src', help='folder of HQ images (read only; local or gs://)')
  p.add_argument(
    '--dst', required=True, help='new folder, local or gs://: images/ and manifest.json'
  )
  p.add_argument('--replay', help='a manifest.json to re-create exactly (ignores the rest)')
  p.add_argument('--fraction', type=float, default=0.15, help='share of eligible images')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument(
    '--resolution',
    type=int,
    default=64,
    help='every image is loaded (centre-cropped, resized) at this size first',
  )
  p.add_argument(
    '--skip_last',
    type=int,
    default=0,
    help='the last N files (sorted) are never contaminated: a validation split '
    '(config.data.num_val) stays pristine',
  )
  p.add_argument('--kinds', default=','.join(KINDS), help='defect kinds, comma-separated')
  for kind, (lo, hi) in DEFAULT_RANGES.items():
    unit = dict(
      blur='sigma, px', resize='downsample factor', jpeg='quality', noise='sigma, 0..255'
    )[kind]
    p.add_argument(
      f'--{kind}_range',
      type=float,
      nargs=2,
      default=(lo, hi),
      metavar=('LOW', 'HIGH'),
      help=f'{kind} strength ({unit}); default {lo} {hi}',
    )
  args = p.parse_args(argv)
  if not args.replay and not args.src:
    p.error('--src DIR is required (or --replay manifest.json)')
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    if args.replay:
      old = json.loads(files.read_text(args.replay))
      if old.get('format') != FORMAT:
        raise ContaminateError(f'{args.replay}: not a contamination manifest ({FORMAT})')
      manifest = dict(
        old, records=[{k: v for k, v in r.items() if k != 'sha256'} for r in old['records']]
      )
    else:
      ranges = {k: tuple(getattr(args, f'{k}_range')) for k in KINDS}
      manifest = plan(
        args.src,
        fraction=args.fraction,
        seed=args.seed,
        resolution=args.resolution,
        skip_last=args.skip_last,
        kinds=[k for k in args.kinds.split(',') if k],
        ranges=ranges,
      )
    files.check_writable(args.dst)  # a missing bucket or no permission: said before any image
    full = build(manifest, args.dst)
    if args.replay:
      want = {r['file']: r['sha256'] for r in old['records']}
      got = {r['file']: r['sha256'] for r in full['records']}
      if want != got:
        diff = sorted(f for f in want if want[f] != got.get(f))
        raise ContaminateError(
          f'replay differs from {args.replay} in {len(diff)} files, e.g. '
          f'{diff[:3]} (a different OpenCV/libjpeg/Pillow build?)'
        )
  except (ContaminateError, FileNotFoundError, files.StorageError) as e:
    return cli.fail(e)
  print(
    f'{args.dst}: {full["num_contaminated"]} of {len(full["records"])} images contaminated '
    f'({", ".join(full["kinds"])}); manifest {files.join(args.dst, MANIFEST)}'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
