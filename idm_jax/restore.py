"""Restore faces in images: the GFPGAN/CodeFormer-style command line, and its library parts.

    python -m idm_jax.restore -i INPUT -o OUT --checkpoint CKPT [--aligned] [--steps N]
        [--sampler ddim] [--t_start 1.0] [--guidance 1.0] [--seed 0] [--batch_size 8]
        [--upscale 2] [--only_center_face] [--detector hog|cnn] [--ext auto|png|jpg]
        [--suffix S] [--version]

INPUT is an image or a folder (searched recursively, sorted; hidden files skipped). CKPT is a
training workdir or an exported .msgpack (idm_jax.inference.export). INPUT, OUT and CKPT may each be local
or in a bucket (gs://...): a TPU pod's shared bucket serves as well as a local disk.

--aligned: inputs are aligned face crops; each is resized to the model resolution and restored.
  OUT/restored_faces/  at the model resolution (PNG)
  OUT/restored_imgs/   at the input's size
  OUT/cmp/             input | restored, side by side at the model resolution
Whole photos (default): faces are detected, aligned, restored and pasted back.
  OUT/cropped_faces/   NAME_KK.png, the aligned crops
  OUT/restored_faces/  NAME_KK.png
  OUT/cmp/             NAME_KK.png, crop | restored
  OUT/restored_imgs/   the photo upscaled by --upscale with the restored faces pasted in
  --only_center_face restores only the face closest to the photo's centre.
  --detector cnn finds small, tilted and profile faces that the default HOG detector misses,
  at a much higher CPU cost (idm_jax.inference.faces).
Sub-folders of INPUT are mirrored under each output folder. Outputs are written atomically.

Each face's noise comes from (--seed, a number derived from the file's name and the face's
number), so a file restores the same whether alone, in a folder, or in any batch.

Bad files (unreadable, empty, not an image, over the pixel limit) are reported by name and
skipped; grayscale, alpha and 16-bit images are converted (with a note). The exit status is 1 if
any file failed, 2 if nothing could be started (bad arguments, model or detector missing).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple
import zlib

import cv2
import numpy as np
from tqdm import tqdm

import idm_jax
from idm_jax.diffusion import samplers
from idm_jax.inference import faces
from idm_jax.runtime import cli
from idm_jax.storage import files
from idm_jax.storage import images

OUTPUT_DIRS = ('cropped_faces', 'restored_faces', 'cmp', 'restored_imgs')


# ----------------------------------------------------------------------------- reading images


def list_inputs(input_path: str) -> List[Tuple[str, str]]:
  """(path, path relative to INPUT) of every non-hidden file, sorted; a file gives itself.

  Every file, not only image extensions: a file that is not an image is reported as failed, so
  the user learns what was not restored.
  """
  if files.isfile(input_path):
    return [(input_path, files.path(input_path).name)]
  if not files.isdir(input_path):
    raise FileNotFoundError(f'{input_path}: no such file or folder')
  try:
    paths = images.list_files(input_path, extensions=None)
  except FileNotFoundError:
    return []  # main says "no files found"
  return [(p, files.relpath(p, input_path)) for p in paths]


def file_index(relpath: str) -> int:
  """A stable per-file number for the noise: CRC-32 of the file's name (its bytes, so a name
  that is not valid UTF-8, which Python holds with surrogate escapes, works too)."""
  return zlib.crc32(os.path.basename(relpath).encode('utf-8', 'surrogateescape')) & 0x7FFFFFFF


def shown(path: str) -> str:
  """A path as it can be printed: bytes that are not UTF-8 shown as U+FFFD, where printing the
  surrogate escapes themselves would raise."""
  return path.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')


# ----------------------------------------------------------------------------- writing images


def output_ext(path: str, ext: str) -> str:
  """'png' or 'jpg' for restored_imgs: the input's own for ext='auto' (png if neither)."""
  if ext != 'auto':
    return ext
  src = os.path.splitext(path)[1].lower().lstrip('.')
  return 'jpg' if src in ('jpg', 'jpeg') else 'png'


def resize(image: np.ndarray, w: int, h: int) -> np.ndarray:
  """Area when shrinking (no aliasing), Lanczos when enlarging."""
  if image.shape[1] == w and image.shape[0] == h:
    return image
  shrink = w * h < image.shape[0] * image.shape[1]
  return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)


def side_by_side(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.concatenate([a, b], axis=1)


# ----------------------------------------------------------------------------- restoring


def restore_aligned(
  images: Sequence[np.ndarray],
  restorer,
  indices: Sequence[int],
  batch_size: int,
  sample_kwargs: Dict,
) -> Tuple[np.ndarray, np.ndarray]:
  """Aligned face crops of any size -> (LQ resized to the model resolution, restored); crop k
  uses noise index indices[k]."""
  from idm_jax.inference import engine  # noqa: PLC0415 (loads flax and orbax: not for --help)

  r = restorer.resolution
  lq = (
    np.stack([resize(im, r, r) for im in images])
    if len(images)
    else np.zeros((0, r, r, 3), np.uint8)
  )
  return lq, engine.restore_in_batches(restorer, lq, indices, batch_size, **sample_kwargs)


@dataclasses.dataclass
class PhotoResult:
  crops: np.ndarray  # (F, R, R, 3) aligned LQ faces
  restored: np.ndarray  # (F, R, R, 3)
  affines: List[np.ndarray]
  image: np.ndarray  # the upscaled photo with the faces pasted back


def restore_photo(
  image: np.ndarray,
  restorer,
  detector,
  *,
  index: int = 0,
  upscale: float = 2.0,
  batch_size: int = 8,
  sample_kwargs: Optional[Dict] = None,
  only_center_face: bool = False,
) -> PhotoResult:
  """Detects, aligns, restores and pastes back every face in an RGB uint8 photo (only the one
  closest to the centre with `only_center_face`).

  `restorer` is anything with `.resolution`, `.lockstep` and `.restore(lq, indices=..., **kw)`;
  face k uses noise index `index + k`.
  """
  from idm_jax.inference import engine  # noqa: PLC0415 (loads flax and orbax: not for --help)

  r = restorer.resolution
  found = detector.detect(image)
  if only_center_face:
    found = faces.center_face(found, image.shape)
  crops, affines = [], []
  for face in found:
    crop, affine = faces.align_face(image, face.landmarks, r)
    crops.append(crop)
    affines.append(affine)
  crops = np.stack(crops) if crops else np.zeros((0, r, r, 3), np.uint8)
  indices = (index + np.arange(len(crops))) % (2**32)
  restored = engine.restore_in_batches(
    restorer, crops, indices, batch_size, **(sample_kwargs or {})
  )
  pasted = faces.paste_faces(image, list(zip(restored, affines)), upscale)
  return PhotoResult(crops=crops, restored=restored, affines=affines, image=pasted)


def sample_settings(
  restorer, seed: int, *, steps=None, sampler=None, t_start=None, guidance=None, eta=None
) -> Dict:
  """The restorer's sampling keyword arguments (None: the model config's default), checked;
  raises ValueError naming the bad setting."""
  from idm_jax.inference import engine  # noqa: PLC0415 (loads flax and orbax: not for --help)

  restorer.resolve_settings(steps, sampler, t_start, guidance, eta)
  engine.check_seed(seed)
  return dict(
    seed=seed, steps=steps, sampler=sampler, t_start=t_start, guidance_scale=guidance, eta=eta
  )


class _Report:
  """Counts and failure messages for the summary; prints as it goes (above the progress bar)."""

  def __init__(self, bar):
    self.bar = bar
    self.restored, self.no_face, self.failed = [], [], []

  def note(self, path, msg):
    self.bar.write(shown(f'note: {path}: {msg}'))

  def fail(self, path, msg):
    self.failed.append((path, msg))
    self.bar.write(shown(f'error: {path}: {msg}'))

  def summary(self) -> str:
    lines = [
      f'restored {len(self.restored)}, no face found {len(self.no_face)}, failed {len(self.failed)}'
    ]
    if self.no_face:
      lines.append('no face found in: ' + ', '.join(self.no_face))
    for path, msg in self.failed:
      lines.append(f'failed: {path}: {msg}')
    return shown('\n'.join(lines))


def _out_path(out_dir: str, sub: str, relpath: str, tail: str) -> str:
  """OUT/sub/<relpath without extension><tail>."""
  return files.join(out_dir, sub, os.path.splitext(relpath)[0] + tail)


def _read(path, report, max_pixels):
  try:
    image, notes = images.read_with_notes(path, max_pixels=max_pixels)
  except images.BadImage as e:
    report.fail(path, e.reason)  # the report names the file
    return None
  for n in notes:
    report.note(path, n)
  return image


def run_aligned(inputs, out_dir, restorer, args, sample_kwargs, report) -> None:
  suffix = f'_{args.suffix}' if args.suffix else ''
  for start in range(0, len(inputs), args.batch_size):
    batch = []
    for path, rel in inputs[start : start + args.batch_size]:
      image = _read(path, report, args.max_pixels)
      if image is not None:
        batch.append((path, rel, image))
    if batch:
      try:
        lq, restored = restore_aligned(
          [im for _, _, im in batch],
          restorer,
          [file_index(rel) for _, rel, _ in batch],
          args.batch_size,
          sample_kwargs,
        )
      except Exception as e:  # pylint: disable=broad-except
        for path, _, _ in batch:
          report.fail(path, f'restoration failed: {type(e).__name__}: {e}')
        restored = None
      if restored is not None:
        for (path, rel, image), x, y in zip(batch, lq, restored):
          try:
            h, w = image.shape[:2]
            images.save(_out_path(out_dir, 'restored_faces', rel, suffix + '.png'), y)
            images.save(
              _out_path(out_dir, 'restored_imgs', rel, f'{suffix}.{output_ext(path, args.ext)}'),
              resize(y, w, h),
            )
            images.save(_out_path(out_dir, 'cmp', rel, '.png'), side_by_side(x, y))
            report.restored.append(path)
          except Exception as e:  # pylint: disable=broad-except  (a bucket's HTTP errors too)
            report.fail(path, f'cannot write output: {e}')
    report.bar.update(len(inputs[start : start + args.batch_size]))


# Restored photos may hold this many times --max_pixels (4: a 40 MP photo at 2x).
OUTPUT_PIXELS_PER_INPUT_LIMIT = 4


def upscaled_too_large(shape, upscale: float, max_pixels: int) -> str | None:
  """Why the upscaled photo would not fit (None if it does): checked before it is allocated, as
  the input's own pixel limit says nothing of a copy `upscale`² times its size."""
  h, w = shape[:2]
  out_h, out_w = int(round(h * upscale)), int(round(w * upscale))
  limit = OUTPUT_PIXELS_PER_INPUT_LIMIT * max_pixels
  if out_h * out_w <= limit:
    return None
  return (
    f'--upscale {upscale:g} would make a {out_w}x{out_h} image '
    f'({out_h * out_w / 1e6:.0f} MP, over the {limit / 1e6:g} MP output limit); lower '
    f'--upscale to at most {(limit / (h * w)) ** 0.5:.2f} for this photo'
  )


def run_photos(inputs, out_dir, restorer, detector, args, sample_kwargs, report) -> None:
  suffix = f'_{args.suffix}' if args.suffix else ''
  for path, rel in inputs:
    image = _read(path, report, args.max_pixels)
    too_large = (
      None if image is None else upscaled_too_large(image.shape, args.upscale, args.max_pixels)
    )
    if too_large:
      report.fail(path, too_large)
    elif image is not None:
      try:
        res = restore_photo(
          image,
          restorer,
          detector,
          index=file_index(rel),
          upscale=args.upscale,
          batch_size=args.batch_size,
          sample_kwargs=sample_kwargs,
          only_center_face=args.only_center_face,
        )
        for k, (crop, face) in enumerate(zip(res.crops, res.restored)):
          images.save(_out_path(out_dir, 'cropped_faces', rel, f'_{k:02d}.png'), crop)
          images.save(_out_path(out_dir, 'restored_faces', rel, f'_{k:02d}{suffix}.png'), face)
          images.save(_out_path(out_dir, 'cmp', rel, f'_{k:02d}.png'), side_by_side(crop, face))
        images.save(
          _out_path(out_dir, 'restored_imgs', rel, f'{suffix}.{output_ext(path, args.ext)}'),
          res.image,
        )
        (report.restored if len(res.crops) else report.no_face).append(path)
      except Exception as e:  # pylint: disable=broad-except
        report.fail(path, f'{type(e).__name__}: {e}')
    report.bar.update(1)


# In the order the summary lists them: restored_imgs first, it is what most people came for.
OUTPUT_DESCRIPTIONS = {
  'restored_imgs': 'whole images',
  'restored_faces': 'restored faces',
  'cropped_faces': 'aligned input faces',
  'cmp': 'input | restored',
}


def outputs_line(out_dir: str) -> str:
  """The summary's last line: where each output folder that was written is."""
  made = [d for d in OUTPUT_DESCRIPTIONS if files.isdir(files.join(out_dir, d))]
  if not made:
    return f'nothing written to {out_dir}'
  root = files.absolute(out_dir)
  return f'results in {root}: ' + ', '.join(f'{d}/ ({OUTPUT_DESCRIPTIONS[d]})' for d in made)


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(
    prog='python -m idm_jax.restore', description='Restore faces with an IDM model.'
  )
  p.add_argument('--version', action='version', version=f'idm_jax {idm_jax.__version__}')
  p.add_argument(
    '-i', '--input', required=True, help='an image or a folder of images (local or gs://)'
  )
  p.add_argument(
    '-o', '--output', required=True, help='output folder, local or gs:// (not inside INPUT)'
  )
  p.add_argument('--checkpoint', required=True, help='training workdir or exported .msgpack')
  p.add_argument('--aligned', action='store_true', help='inputs are aligned face crops')
  p.add_argument('--steps', type=int, default=None, help='sampling steps (default: config)')
  p.add_argument('--sampler', choices=samplers.SAMPLERS, default=None)
  p.add_argument('--eta', type=float, default=None, help='DDIM stochasticity in [0, 1]')
  p.add_argument(
    '--t_start',
    type=float,
    default=None,
    help='in (0, 1]; < 1 starts from the noised input (keeps more of it)',
  )
  p.add_argument('--guidance', type=float, default=None, help='classifier-free guidance scale')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--upscale', type=float, default=2.0, help='whole photos: background upscale')
  p.add_argument(
    '--only_center_face',
    action='store_true',
    help='whole photos: restore only the face closest to the centre',
  )
  p.add_argument(
    '--ext',
    choices=('auto', 'png', 'jpg'),
    default='auto',
    help='format of restored_imgs (auto: as the input)',
  )
  p.add_argument('--suffix', default='', help='appended to restored file names: NAME_S.ext')
  p.add_argument(
    '--detector',
    choices=faces.DETECTORS,
    default=None,
    help="whole photos: dlib's face detector (default: hog); cnn also finds "
    'small, tilted and profile faces, at about 80 times the CPU time',
  )
  p.add_argument(
    '--min_face_score',
    type=float,
    default=None,
    help='whole photos: detector score threshold; the detectors score on '
    'different scales (default: '
    + ', '.join(f'{v} for {k}' for k, v in faces.DEFAULT_MIN_SCORE.items())
    + ')',
  )
  p.add_argument(
    '--max_pixels', type=int, default=images.MAX_PIXELS, help='inputs with more pixels are rejected'
  )
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)

  if args.batch_size < 1:
    return cli.fail('--batch_size must be >= 1')
  if args.upscale <= 0 or args.upscale > 8:
    return cli.fail('--upscale must be in (0, 8]')
  if args.aligned and args.only_center_face:
    return cli.fail(
      '--only_center_face chooses among the faces of whole photos; with --aligned '
      'each input is already one face'
    )
  if args.aligned and args.detector:
    return cli.fail(
      '--detector finds the faces of whole photos; with --aligned each input is already one face'
    )
  try:
    inputs = list_inputs(args.input)
  except FileNotFoundError as e:
    return cli.fail(str(e))
  if not inputs:
    return cli.fail(f'{args.input}: no files found')
  if files.isdir(args.input) and files.is_within(args.output, args.input):
    return cli.fail(
      f'output folder {args.output} is inside the input folder {args.input}; '
      'choose another one (outputs are never written into the input folder)'
    )
  if files.exists(args.output) and not files.isdir(args.output):
    return cli.fail(f'{args.output} exists and is not a folder')
  try:  # A missing bucket or no permission: said now, not after the model has loaded.
    files.check_writable(args.output)
  except files.StorageError as e:
    return cli.fail(str(e))

  detector = None
  if not args.aligned:
    try:
      detector = faces.get_detector(args.detector or 'hog', min_score=args.min_face_score)
    except faces.DetectorUnavailable as e:
      return cli.fail(str(e))

  from idm_jax.inference import engine  # noqa: PLC0415 (loads flax and orbax: not for --help)

  try:
    restorer, _ = engine.load(args.checkpoint)
  except (OSError, ValueError) as e:
    return cli.fail(f'cannot load the model: {e}')
  try:  # Check the settings once, before any file is touched.
    sample_kwargs = sample_settings(
      restorer,
      args.seed,
      steps=args.steps,
      sampler=args.sampler,
      t_start=args.t_start,
      guidance=args.guidance,
      eta=args.eta,
    )
  except ValueError as e:
    return cli.fail(str(e))

  files.makedirs(args.output)
  with tqdm(total=len(inputs), unit='img', desc='restoring', disable=None) as bar:
    report = _Report(bar)
    if args.aligned:
      run_aligned(inputs, args.output, restorer, args, sample_kwargs, report)
    else:
      run_photos(inputs, args.output, restorer, detector, args, sample_kwargs, report)
  print(report.summary())
  print(outputs_line(args.output))
  return 1 if report.failed else 0


if __name__ == '__main__':
  sys.exit(main())
