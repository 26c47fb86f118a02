"""What a run shows: metrics.jsonl and TensorBoard events, on local disk and in a gs:// bucket."""

import json
import os
import re

import numpy as np
import pytest

from idm_jax.storage import files
from idm_jax.training import run_log


@pytest.fixture
def workdir(local_or_bucket):
  return files.join(local_or_bucket, 'run')


def _steps(workdir):
  path = files.join(workdir, 'metrics.jsonl')
  return [json.loads(line)['step'] for line in files.iter_lines(path)] if files.exists(path) else []


def test_metrics_and_events_reach_the_workdir_local_at_once_bucket_in_batches(workdir):
  writer = run_log.Writer(workdir)
  writer.REMOTE_FLUSH_SECONDS = 3600.0  # in a bucket only close (or a grid) writes here
  writer.scalars(1, {'loss': 1.0})
  writer.scalars(2, {'loss': 0.5})
  assert _steps(workdir) == ([] if writer.remote else [1, 2])  # local: a reader can tail -f
  batch = {'lq': np.zeros((2, 16, 16, 3), np.uint8), 'hq': np.full((2, 16, 16, 3), 255, np.uint8)}
  writer.sample_grid(2, batch, batch['hq'], conditional=True)  # flushes; a bucket rotates
  assert _steps(workdir) == [1, 2, 2]  # the grid's PSNR/SSIM line
  writer.scalars(3, {'loss': 0.25})
  writer.close()
  assert _steps(workdir) == [1, 2, 2, 3]
  assert 'samples_0000002.png' in files.listdir(workdir)
  events = files.listdir(files.join(workdir, 'tensorboard'))
  assert len(events) == (2 if writer.remote else 1)
  # What TensorBoard reads back: every scalar and the grid, whichever file holds them.
  values = [
    v
    for name in events
    for v in _summary_values(files.read_bytes(files.join(workdir, 'tensorboard', name)))
  ]
  assert {step: v.simple_value for step, v in values if v.tag == 'loss'} == {
    1: 1.0,
    2: 0.5,
    3: 0.25,
  }
  assert [step for step, v in values if v.tag == 'samples' and v.HasField('image')] == [2]


def _summary_values(data: bytes):
  """(step, Summary.Value) of an event file: TFRecord framing (length, CRC, payload, CRC)."""
  import struct

  from tensorboardX.proto import event_pb2

  out, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack('<Q', data[pos : pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
    pos += 12 + length + 4
    out += [(event.step, v) for v in event.summary.value]
  return out


def test_progress_total_follows_the_time_budget():
  from tqdm import tqdm

  bar = tqdm(total=1000, initial=0, disable=False, file=open(os.devnull, 'w'))
  bar.update(10)
  run_log.shorten_to_budget(bar, 10, 1000, seconds_left=0.0)
  assert bar.total == 10  # no time left: this is the last step
  run_log.shorten_to_budget(bar, 10, 1000, seconds_left=1e9)
  assert bar.total == 1000  # num_steps ends first
  run_log.shorten_to_budget(bar, 10, 1000, seconds_left=None)
  assert bar.total == 1000  # no budget: unchanged
  bar.close()


def _shown_seconds_left(bar) -> float:
  """The ETA as the bar prints it: '[elapsed<left, rate]'."""
  left = re.search(r'<([0-9:]+)', str(bar)).group(1)
  seconds = 0
  for part in left.split(':'):
    seconds = seconds * 60 + int(part)
  return seconds


def test_progress_eta_holds_the_runs_pace_through_saves_and_bursts():
  """Each ten steps: seven reported a second apart, a 10 s save, then three steps that ran
  during 3 s reported at once (a dispatch burst). The pace is 2 s a step; the ETA the bar prints
  stays within 15% of the time really left at every report, instead of swinging with the last
  few."""
  clock = [0.0]
  bar = run_log.progress(0, 200)
  bar.fp = open(os.devnull, 'w')
  bar._time = lambda: clock[0]
  bar.start_t = bar.last_print_t = 0.0
  step = 0
  for _ in range(20):
    reports = [(1.0, 1)] * 7 + [(10.0 + 3.0, 3)]
    for seconds, steps in reports:
      clock[0] += seconds
      step += steps
      bar.update(steps)
      if step >= 20 and step < 200:
        truth = (200 - step) * 2.0
        assert abs(_shown_seconds_left(bar) - truth) <= 0.15 * truth + 2, (step, str(bar))
  bar.close()
