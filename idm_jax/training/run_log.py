"""What a user sees of a run: progress bar, metrics (stdout, metrics.jsonl, TensorBoard), PNG grids.

Only process 0 writes; on other processes every method is a no-op, so callers need no `if`.
TensorBoard event files come from tensorboardX, which needs no TensorFlow.

In a bucket nothing can be appended: an object is rewritten whole. So for a gs:// workdir the
event files are written to a local staging folder and uploaded to WORKDIR/tensorboard/ (where
`tensorboard --logdir gs://...` reads them), and metrics.jsonl is rewritten, both at most every
REMOTE_FLUSH_SECONDS and at close. A new event file starts after each sample grid, so an upload
never carries the images of earlier grids. (tensorboardX's own gs:// writer rewrites one
ever-growing file and re-uploads it when garbage-collected, even after close.) A local workdir is
written as each line comes (a reader can `tail -f`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

from absl import logging
import numpy as np
from tqdm import tqdm

from idm_jax.metrics import fidelity
from idm_jax.storage import files
from idm_jax.storage import images


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
  """rows: equal-shaped (N, H, W, 3) uint8 arrays -> one image, a row of N images per array."""
  n, h, w, _ = rows[0].shape
  grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
  for r, row in enumerate(rows):
    for c in range(n):
      y, x = pad + r * (h + pad), pad + c * (w + pad)
      grid[y : y + h, x : x + w] = row[c]
  return grid


def progress(start: int, end: int, enabled: bool = True, desc: str = 'train'):
  """The training bar. Its pace is this run's average since the bar opened (the step is
  compiled before), pauses for checkpoints and sample grids included: a smoothed recent rate
  swings between the dispatch bursts and the saves, and so does the ETA built on it."""
  return tqdm(
    total=end,
    initial=start,
    desc=desc,
    disable=not enabled,
    dynamic_ncols=True,
    unit='step',
    smoothing=0,
    file=_LossTolerantStream(sys.stderr),
  )


class _LossTolerantStream:
  """The bar's stream (stderr) for as long as it lasts. A lost terminal (EIO), a dead `tee` or
  ssh pipe (EPIPE) or a closed file make writes fail; tqdm shrugs off the first and the last but
  raises EPIPE, which would end the run before its save. On the first failure the broken file
  descriptor is pointed at /dev/null (Python's own advice for SIGPIPE, in the `signal` docs), and
  stdout too when it is the same pipe (`2>&1`): the log lines and the exit-time flush, which
  would otherwise turn exit 0 into 120, then go nowhere instead of failing."""

  def __init__(self, stream):
    self._stream = stream

  def __getattr__(self, name):  # fileno, isatty, encoding: tqdm sizes the bar through them
    return getattr(self._stream, name)

  def write(self, text: str) -> int:
    try:
      return self._stream.write(text)
    except BlockingIOError:  # a full non-blocking pipe: this update is dropped, not the stream
      return len(text)
    except (OSError, ValueError):
      _silence_lost_streams()
      return len(text)

  def flush(self) -> None:
    try:
      self._stream.flush()
    except (OSError, ValueError):
      _silence_lost_streams()


def _silence_lost_streams() -> None:
  """Points stderr's descriptor, and stdout's if it shares stderr's file, at /dev/null."""
  try:
    err = sys.__stderr__.fileno()
    targets = [err]
    try:
      out = sys.__stdout__.fileno()
      a, b = os.fstat(err), os.fstat(out)
      if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        targets.append(out)
    except (OSError, ValueError, AttributeError):
      pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in targets:
      os.dup2(devnull, fd)
    os.close(devnull)
  except (OSError, ValueError, AttributeError):  # closed or no stderr at all: nothing to point
    pass


def shorten_to_budget(bar, step: int, end: int, seconds_left: float | None) -> None:
  """Under a time budget, the bar's total becomes the step the budget will end at (from the
  recent rate), or `end` if that comes first, so its ETA is the time the run will really stop."""
  if seconds_left is None or bar.disable:
    return
  info = bar.format_dict
  rate = info.get('rate') or (bar.n - bar.initial) / max(info['elapsed'], 1e-9)
  if not rate:
    return
  reachable = step + max(0, int(seconds_left * rate))
  total = max(step, min(end, reachable))
  if total != bar.total:
    bar.total = total
    bar.refresh()


class Writer:
  """metrics.jsonl + TensorBoard + absl log lines, and sample grids as PNG.

  Each write is one request (an object rewritten whole), made again through
  files.call_with_retries after a transient failure (files.is_transient: a 503 or 429, a
  timeout, a dropped connection) that outlived the storage client's own retries: WRITE_ATTEMPTS
  tries, WRITE_BACKOFF_S apart and doubling. Only the first failure of a streak gets them: while
  an object keeps failing, each later occasion makes one try, so an outage costs host 0 no more
  than the client's own retries per write. A write that still fails never stops the run:
  only process 0 writes, and an exception out of its loop would leave the other hosts waiting in
  the next collective. It is named in one warning and made again later: metrics lines and event
  files at the next flush, a grid at the next log step (then dropped, with a warning).
  """

  REMOTE_FLUSH_SECONDS = 15.0
  GRID_ATTEMPTS = 2  # a grid's writes before it is dropped: grids are for looking, not keeping
  WRITE_ATTEMPTS = 2  # tries of one write through files.call_with_retries (see above)
  WRITE_BACKOFF_S = 2.0  # the wait before the second

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self.remote = files.is_remote(workdir)
    self._tb = None
    self._tb_files = 0
    self._staging = None  # local folder of the event files a bucket workdir gets
    self._uploaded: dict[str, int] = {}
    self._pending: list[str] = []  # metrics lines not yet in metrics.jsonl
    self._metrics = files.AppendedText(files.join(workdir, 'metrics.jsonl'))
    self._closed_events: set[str] = set()  # staged event files to remove once uploaded
    self._grids: dict[str, tuple[bytes, int, int]] = {}  # unwritten: path -> (PNG, fails, step)
    self._failing: set[str] = set()  # what failed at its last try (one warning per streak)
    self._last_flush = time.monotonic()
    if enabled:
      files.makedirs(workdir)
      if self.remote:
        self._staging = tempfile.mkdtemp(prefix='idm_jax_tensorboard_')
      self._open_tb()

  def _open_tb(self) -> None:
    """(Re)opens the event writer; each file gets a distinct name (the count as suffix)."""
    from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional: tensorboardX)

    if self._tb is not None:
      self._tb.close()
      self._closed_events.update(os.listdir(self._staging) if self._staging else ())
      self._upload_events()
    logdir = self._staging or files.join(self.workdir, 'tensorboard')
    self._tb = SummaryWriter(logdir, filename_suffix=f'.{self._tb_files}' if self._tb_files else '')
    self._tb_files += 1

  def _attempt(self, what: str, write) -> bool:
    """write(), made again after a transient failure (at the first failure of a streak); False
    (with a warning on the first of a streak of failures) if it still raised."""
    attempts = self.WRITE_ATTEMPTS if what not in self._failing else 1
    try:
      files.call_with_retries(write, attempts=attempts, backoff_s=self.WRITE_BACKOFF_S)
    except Exception as e:  # pylint: disable=broad-except  (storage clients raise many types)
      if what not in self._failing:
        self._failing.add(what)
        logging.warning(
          'could not write %s (%s: %s); the run goes on and tries again later',
          files.join(self.workdir, what),
          type(e).__name__,
          str(e).strip().splitlines()[0][:200] if str(e).strip() else '',
        )
      return False
    if what in self._failing:
      self._failing.discard(what)
      logging.info('wrote %s after the earlier failure', files.join(self.workdir, what))
    return True

  def _upload_events(self) -> None:
    """Uploads the staged event files that grew since their last upload, and removes the
    closed ones from staging once uploaded whole."""
    if self._staging is None:
      return
    for name in sorted(os.listdir(self._staging)):
      local = os.path.join(self._staging, name)
      size = os.path.getsize(local)  # event files only grow: a new size is new content
      if self._uploaded.get(name) != size:
        with open(local, 'rb') as f:
          data = f.read()
        if not self._attempt(
          f'tensorboard/{name}',
          lambda name=name, data=data: files.write_atomic(
            files.join(self.workdir, 'tensorboard', name), data
          ),
        ):
          continue
        self._uploaded[name] = len(data)
      if name in self._closed_events:
        os.remove(local)
        self._closed_events.discard(name)

  def _write_metrics(self) -> None:
    """Adds the pending lines to metrics.jsonl (files.AppendedText: an append that failed is
    made again later, with newer lines too, and no line is lost or written twice)."""
    self._metrics.append(''.join(self._pending))
    self._pending = []

  def _write_grid(self, path: str, png: bytes, failed: int, step: int) -> None:
    """Writes a grid; one that fails waits in self._grids for a log step after `step`."""
    name = files.relpath(path, self.workdir)
    if self._attempt(name, lambda: files.write_atomic(path, png)):
      return
    if failed + 1 < self.GRID_ATTEMPTS:
      self._grids[path] = (png, failed + 1, step)
      return
    self._failing.discard(name)
    logging.warning('dropped the sample grid %s: %d writes failed', path, failed + 1)

  def _retry_grids(self, step: int | None = None) -> None:
    """Tries again the grids that failed before `step` (all of them if None)."""
    for path, (png, failed, queued) in list(self._grids.items()):
      if step is None or queued < step:
        del self._grids[path]
        self._write_grid(path, png, failed, queued)

  def scalars(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    logging.info('step %d: %s', step, ', '.join(f'{k}={v:.5g}' for k, v in metrics.items()))
    self._pending.append(json.dumps({'step': step, **metrics}) + '\n')
    for k, v in metrics.items():
      self._tb.add_scalar(k, v, step)
    self._retry_grids(step)  # a grid that failed is tried again at the next log step
    self.flush(force=not self.remote)

  def flush(self, force: bool = True) -> None:
    """Writes pending metrics lines and TensorBoard events; in a bucket only when forced or
    REMOTE_FLUSH_SECONDS have passed since the last rewrite."""
    if not self.enabled:
      return
    if not force and time.monotonic() - self._last_flush < self.REMOTE_FLUSH_SECONDS:
      return
    if self._pending:  # the lines stay pending if it fails
      self._attempt('metrics.jsonl', self._write_metrics)
    self._tb.flush()
    self._upload_events()
    self._last_flush = time.monotonic()

  def sample_grid(self, step: int, batch: dict, samples: np.ndarray, conditional: bool) -> dict:
    """Saves samples_<step>.png (LQ | EMA sample | HQ rows); logs PSNR/SSIM vs HQ if restoring."""
    if not self.enabled:
      return {}
    metrics = {}
    if conditional:
      rows = [batch['lq'], samples, batch['hq']]
      metrics = dict(
        vis_psnr=float(np.mean([fidelity.psnr(s, h) for s, h in zip(samples, batch['hq'])])),
        vis_ssim=float(np.mean([fidelity.ssim(s, h) for s, h in zip(samples, batch['hq'])])),
      )
    else:
      rows = [samples]
    # Small models (the demo's 32 px) are hard to see: show them at least 128 px wide.
    zoom = max(1, 128 // samples.shape[1])
    grid = image_grid([np.repeat(np.repeat(np.asarray(r), zoom, 1), zoom, 2) for r in rows])
    self._write_grid(
      files.join(self.workdir, f'samples_{step:07d}.png'), images.encode(grid), 0, step
    )
    self._tb.add_image('samples', grid, step, dataformats='HWC')
    if metrics:
      self.scalars(step, metrics)
    if self.remote:  # this file is rewritten whole on each flush: let the next one start light
      self.flush()
      self._open_tb()
    return metrics

  def close(self):
    """Writes what is pending (one more try for what failed); warns about what still fails."""
    if self._tb is not None:
      self._retry_grids()
      self.flush()
      self._tb.close()
      self._tb = None
      self._closed_events.update(os.listdir(self._staging) if self._staging else ())
      self._upload_events()
    if self._pending:
      logging.warning(
        '%d metrics lines (steps %s to %s, in this log above) could not be written to %s',
        len(self._pending),
        json.loads(self._pending[0])['step'],
        json.loads(self._pending[-1])['step'],
        files.join(self.workdir, 'metrics.jsonl'),
      )
    if self._staging is not None:
      if self._closed_events:
        logging.warning(
          '%d TensorBoard event files could not be uploaded to %s',
          len(self._closed_events),
          files.join(self.workdir, 'tensorboard'),
        )
      shutil.rmtree(self._staging, ignore_errors=True)
      self._staging = None
