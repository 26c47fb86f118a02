"""Cleaning a dataset with a model (`--config.mode=clean`), the extrinsic method's one step.

The model's EMA params restore the training set's HQ images themselves (the HQ image is the LQ
input), either all of them or only the worst-scoring share by a no-reference score (there is no
ground truth for "truly high quality"): NIQE, or `clean.score='artifacts'`, metrics/artifacts.py's
outlier score within the set. The rest are copied byte for byte. The output is a new folder
dataset (cleaned_dataset.py: its files, how a killed run resumes, how it is verified); the source
is never written to. rounds.py repeats train + clean.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json

from absl import logging
import jax
import numpy as np
from tqdm import tqdm

from idm_jax.data import sources
from idm_jax.extrinsic import cleaned_dataset
from idm_jax.inference import engine
from idm_jax.inference import validation
from idm_jax.metrics import artifacts
from idm_jax.metrics import niqe
from idm_jax.metrics import resize
from idm_jax.runtime import configlib
from idm_jax.runtime import host_shares
from idm_jax.runtime import parallel
from idm_jax.storage import files
from idm_jax.storage import images


def niqe_scores(source, params, resolution: int) -> dict[str, float | None]:
  """NIQE of every record (higher = worse); None for records that fail to load."""
  scores = {}
  for i in tqdm(range(len(source)), desc='score', disable=jax.process_index() != 0):
    rec = source[i]
    img = rec.get('image')
    scores[rec['name']] = None if img is None else niqe_of(img, params, resolution)
  return scores


def artifact_scores(source) -> dict[str, float | None]:
  """metrics.artifacts' outlier score of every record within the set (higher = worse)."""
  feats = {}
  for i in tqdm(range(len(source)), desc='score', disable=jax.process_index() != 0):
    rec = source[i]
    feats[rec['name']] = None if rec.get('image') is None else artifacts.features(rec['image'])
  good = [n for n, f in feats.items() if f is not None]
  z = dict(zip(good, artifacts.outlier_scores([feats[n] for n in good]).tolist()))
  return {n: z.get(n) for n in feats}


def niqe_of(img: np.ndarray, params, resolution: int) -> float:
  """NIQE on the Lanczos upscale the evaluation reports it on (2x for 128 px; NIQE needs 192)."""
  img = resize.upscale_lanczos(img, niqe.upscale_for(resolution))
  return float(niqe.niqe_score(img, params))


def select_worst(scores: dict[str, float | None], fraction: float) -> set[str]:
  """The round(fraction * n) names with the highest (worst) score; ties broken by name. Records
  without a score (None: failed to load) are never selected."""
  valid = sorted(((s, n) for n, s in scores.items() if s is not None), key=lambda x: (-x[0], x[1]))
  k = int(round(fraction * len(valid)))
  return {n for _, n in valid[:k]}


def restore_mean(
  restorer: engine.Restorer,
  indices: np.ndarray,
  lq: np.ndarray,
  *,
  samples: int,
  seed: int,
  **settings,
) -> np.ndarray:
  """The mean of `samples` restorations of each face, uint8. Draw k of record i uses the noise
  index i * samples + k, so one draw (samples=1) is the plain restoration and every draw of every
  record has noise of its own."""
  total = np.zeros(lq.shape, np.float64)
  for k in range(samples):
    total += restorer.restore(lq, indices=np.asarray(indices) * samples + k, seed=seed, **settings)
  return np.rint(total / samples).astype(np.uint8)


def clean_dataset(
  source,
  restorer: engine.Restorer,
  out_dir: str,
  *,
  clean_cfg,
  seed: int,
  niqe_params: str | None,
  resolution: int,
  provenance: dict,
  concurrency: int = files.IO_CONCURRENCY,
) -> dict:
  """Cleans `source` into the folder dataset `out_dir`; resumable; returns the manifest.

  niqe_params: the pristine NIQE parameters that rank images when clean_cfg.score is 'niqe' and
  clean_cfg.fraction < 1 (None: the shipped ones). Each process scores and cleans its
  `inference.host_share` of the records (all of them agree on the selection: the scores are
  gathered); files are read, written and copied `concurrency` at a time, the next batch's
  images read while this one is restored, and its files written while the next one is.
  """
  finished = cleaned_dataset.read_manifest(out_dir)
  if finished is not None:
    cleaned_dataset.verify_manifest(out_dir)
    return finished
  pi = jax.process_index()
  files.makedirs(files.join(out_dir, cleaned_dataset.IMAGES))

  if isinstance(source, sources.FolderSource):  # names without decoding every file
    names = [source.name(i) for i in range(len(source))]
  else:
    names = [source[i]['name'] for i in range(len(source))]
  if len(set(names)) != len(names):
    raise ValueError('the source has duplicate record names; cannot make a one-to-one copy')
  fraction = float(clean_cfg.fraction)
  kind = str(clean_cfg.score)
  if kind not in configlib.CLEAN_SCORES:  # a library call need not come through validate
    raise ValueError(f'config.clean.score: {kind!r} is not one of {configlib.CLEAN_SCORES}')
  params = None  # NIQE's, only where NIQE ranks the records
  scores = None
  checksums = {}
  selected = set(names)
  if fraction < 1.0:
    if kind == 'niqe':
      params = niqe.load_niqe_params(niqe_params or niqe.default_params_path())
    scores, checksums = _selection_scores(
      source, names, kind, params, resolution, out_dir, concurrency=concurrency, write=pi == 0
    )
    selected = select_worst(scores, fraction)

  done = cleaned_dataset.read_journals(out_dir, concurrency)
  mine = [int(i) for i in host_shares.host_share(len(names)) if names[i] not in done]
  to_clean = [i for i in mine if names[i] in selected]
  to_copy = [i for i in mine if names[i] not in selected]
  journal = cleaned_dataset.Journal(out_dir, pi)
  with tqdm(total=len(mine), desc='clean', disable=pi != 0) as bar:
    try:
      for entry in cleaned_dataset.copy_records(
        source, to_copy, names, out_dir, checksums=checksums, concurrency=concurrency
      ):
        journal.add(entry)
        bar.update(1)
      _clean_records(
        source,
        names,
        to_clean,
        restorer,
        out_dir,
        journal,
        bar,
        clean_cfg=clean_cfg,
        seed=seed,
        params=params,
        resolution=resolution,
        concurrency=concurrency,
      )
    finally:  # what was written is journalled, killed or not
      journal.flush()

  parallel.barrier('clean: all records written')
  if pi != 0:
    return {}
  cleaned_dataset.remove_partial_writes(out_dir)  # every process is done writing
  done = cleaned_dataset.read_journals(out_dir, concurrency)
  missing = [n for n in names if n not in done]
  if missing:
    raise RuntimeError(f'{out_dir}: {len(missing)} records were not written, e.g. {missing[:3]}')
  records = [dict(done[n], score=(scores or {}).get(n)) for n in names]
  counts = {a: sum(r['action'] == a for r in records) for a in ('cleaned', 'copied', 'failed')}
  manifest = dict(
    format=cleaned_dataset.FORMAT,
    source_records=len(names),
    counts=counts,
    settings=dict(clean_cfg.to_dict() if hasattr(clean_cfg, 'to_dict') else clean_cfg),
    records=records,
    **provenance,
  )
  after = [(r['score'], r['score_after']) for r in records if r.get('score_after') is not None]
  if after:  # a first check of the model: did cleaning lower the score that selected them?
    manifest['cleaned_niqe'] = dict(
      before=float(np.mean([b for b, _ in after])), after=float(np.mean([a for _, a in after]))
    )
    logging.info(
      'NIQE of the cleaned records: %.3f before, %.3f after',
      manifest['cleaned_niqe']['before'],
      manifest['cleaned_niqe']['after'],
    )
  cleaned_dataset.write_manifest(out_dir, manifest)
  logging.info('cleaned dataset %s: %s', out_dir, counts)
  return manifest


def _clean_records(
  source,
  names,
  to_clean,
  restorer,
  out_dir: str,
  journal,
  bar,
  *,
  clean_cfg,
  seed: int,
  params,
  resolution: int,
  concurrency: int,
) -> None:
  """Restores the records `to_clean` (this process's) in lockstep batches, journalling each.

  Three stages overlap: batch k+1's files are read and decoded, batch k is restored, batch
  k-1's files are encoded, written and journalled. A kill (or an error) waits for the writes in
  flight and journals them; the batch being restored is redone on resume.
  """
  bs = int(clean_cfg.batch_size)
  settings = dict(
    seed=seed,
    steps=int(clean_cfg.steps),
    sampler=clean_cfg.sampler,
    t_start=float(clean_cfg.t_start),
  )
  restore = functools.partial(restore_mean, restorer, samples=int(clean_cfg.samples), **settings)
  chunks = [
    idx
    for (idx,) in host_shares.lockstep_chunks(bs, restorer.lockstep, np.array(to_clean, np.int64))
  ]
  load = functools.partial(load_records, source, names, concurrency=concurrency)
  write = functools.partial(
    _write_cleaned, out_dir, journal, params=params, resolution=resolution, concurrency=concurrency
  )
  writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='clean-write')
  pending = None
  batches = _prefetched(load, chunks)
  try:
    for idx, records in batches:
      good = [(i, r) for i, r in zip(idx, records) if r.get('image') is not None]
      for i, r in zip(idx, records):
        if r.get('image') is None:
          journal.add(dict(name=names[i], action='failed', reason=r.get('error', '')))
      # Even with no good image (all failed, or this host is done) a lockstep Restorer runs a
      # batch, because the other hosts' images are in it.
      lq = (
        np.stack([r['image'] for _, r in good])
        if good
        else np.zeros((0, resolution, resolution, 3), np.uint8)
      )
      restored = host_shares.call_padded(restore, bs, np.array([i for i, _ in good], np.int64), lq)
      if pending is not None:
        pending.result()  # one batch in writing at a time: memory stays bounded
      pending = writer.submit(write, [(names[i], img) for (i, _), img in zip(good, restored)])
      bar.update(len(idx))
  finally:
    batches.close()  # a read in flight is waited for, not left running
    try:
      if pending is not None:
        pending.result()
    finally:
      writer.shutdown(wait=True)


def _write_cleaned(
  out_dir: str, journal, items, *, params, resolution: int, concurrency: int
) -> None:
  """Encodes, writes and journals cleaned images (name, uint8 image), `concurrency` at a time;
  with NIQE parameters, each entry also has the score of the cleaned image (score_after). Raises
  after journalling the others if a write failed (after its retries)."""

  def one(item):
    name, img = item
    rel = cleaned_dataset.out_name(name, cleaned=True)
    data = images.encode(img)
    files.call_with_retries(
      files.write_atomic, files.join(out_dir, cleaned_dataset.IMAGES, rel), data
    )
    entry = dict(name=name, file=rel, action='cleaned', sha256=hashlib.sha256(data).hexdigest())
    if params is not None:  # did cleaning lower the score that chose it?
      entry['score_after'] = niqe_of(img, params, resolution)
    return entry

  errors, entries = [], []
  for k, result in files.map_many(one, items, concurrency=concurrency):
    if isinstance(result, Exception):
      errors.append((items[k][0], result))
    else:
      entries.append(result)
  journal.add_all(entries)
  if errors:
    name, e = errors[0]
    raise RuntimeError(
      f'{out_dir}: {len(errors)} cleaned images could not be written, the first '
      f'{name!r}: {type(e).__name__}: {e}'
    ) from e


def _prefetched(load, chunks):
  """(chunk, load(chunk)) for each chunk, the next one loading while the caller works on this."""
  if not chunks:
    return
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='clean-read') as ahead:
    future = ahead.submit(load, chunks[0])
    for k, chunk in enumerate(chunks):
      loaded = future.result()
      if k + 1 < len(chunks):
        future = ahead.submit(load, chunks[k + 1])
      yield chunk, loaded


def load_records(
  source, names, indices, *, concurrency: int = files.IO_CONCURRENCY, with_bytes: bool = False
) -> list[dict]:
  """source[i] for each index, a folder's files read and decoded `concurrency` at a time (a read
  that fails after its retries is a bad record naming the file). with_bytes: a folder's records
  also hold their file's bytes as 'data' (for checksums)."""
  if not isinstance(source, sources.FolderSource):
    return [source[int(i)] for i in indices]

  def one(i):
    path, name = source.paths[i], names[i]
    try:
      data = files.call_with_retries(files.read_whole, path)
    except Exception as e:  # pylint: disable=broad-except  (a bad record, named)
      return sources.bad_record(name, cleaned_dataset.read_failure(path, e))
    try:
      rec = {'image': sources.load_image(data, source.resolution, name), 'name': name}
    except images.BadImage as e:
      rec = sources.bad_record(name, e.reason)
    if with_bytes:
      rec['data'] = data
    return rec

  indices = [int(i) for i in indices]
  out = [None] * len(indices)
  for k, result in files.map_many(one, indices, concurrency=concurrency):
    if isinstance(result, Exception):  # a defect in decoding, not in the file: raise it
      raise result
    out[k] = result
  return out


def _selection_scores(
  source, names, kind: str, params, resolution: int, out_dir: str, *, concurrency: int, write: bool
) -> tuple[dict[str, float | None], dict[str, str]]:
  """(every record's score by `kind`, the sha256 of every source file read) by name. Each
  process scores its host share, and the shares are gathered, so every process selects the
  same records. Read back from OUT/scores.json (and source_sha256.json) where an earlier
  (killed) run wrote them, so a resumed run selects the same records without scoring again."""
  path = files.join(out_dir, cleaned_dataset.SCORES)
  sums_path = files.join(out_dir, cleaned_dataset.SOURCE_SHA256)
  # Agreed: scoring gathers over every process, so all of them score, or none.
  if not parallel.max_over_processes(int(not files.exists(path))):
    sums = json.loads(files.read_text(sums_path)) if files.exists(sums_path) else {}
    return json.loads(files.read_text(path)), sums
  n = len(names)
  share = host_shares.host_share(n)
  width = 2 if kind == 'artifacts' else 1  # artifacts: the features; the score needs them all
  values = np.full((len(share), width), np.nan)
  digests = np.zeros((len(share), 32), np.uint8)
  chunk = max(64, 4 * concurrency)
  chunks = [share[s : s + chunk] for s in range(0, len(share), chunk)]
  load = functools.partial(load_records, source, names, concurrency=concurrency, with_bytes=True)
  done = 0
  with tqdm(total=len(share), desc='score', disable=jax.process_index() != 0) as bar:
    for idx, records in _prefetched(load, chunks):
      for k, rec in enumerate(records, done):
        if rec.get('data') is not None:
          digests[k] = np.frombuffer(hashlib.sha256(rec['data']).digest(), np.uint8)
        if rec.get('image') is None:
          continue
        if kind == 'artifacts':
          values[k] = artifacts.features(rec['image'])
        else:
          values[k] = niqe_of(rec['image'], params, resolution)
      done += len(idx)
      bar.update(len(idx))
  values, digests = host_shares.gather_shares(values, n), host_shares.gather_shares(digests, n)
  ok = ~np.isnan(values).any(axis=1)
  if kind == 'artifacts':
    good = np.flatnonzero(ok)
    z = artifacts.outlier_scores([tuple(v) for v in values[good].tolist()]).tolist()
    score_of = dict(zip(good.tolist(), z))
  else:
    score_of = {i: float(values[i, 0]) for i in np.flatnonzero(ok).tolist()}
  scores = {names[i]: score_of.get(i) for i in range(n)}
  sums = {names[i]: digests[i].tobytes().hex() for i in range(n) if digests[i].any()}
  if write:  # the checksums first: scores.json marks the scoring done
    if sums:
      files.write_atomic(sums_path, json.dumps(sums, indent=1).encode())
    files.write_atomic(path, json.dumps(scores, indent=1).encode())
  return scores, sums


def _provenance(config, workdir: str, step: int | None) -> dict:
  return dict(
    source=dict(config.data.to_dict()), model=dict(workdir=files.absolute(workdir), step=step)
  )


def clean_with_model(config, model_workdir: str, out_dir: str) -> dict:
  """Cleans config.data's training split with the EMA model in model_workdir."""
  restorer, step = engine.load(model_workdir, config)
  model_config = restorer.config
  # Records load at the model's resolution, whatever the run's config says.
  source = sources.make_source(model_config.data, 'train')
  return clean_dataset(
    source,
    restorer,
    out_dir,
    clean_cfg=config.clean,
    seed=config.seed,
    niqe_params=validation.niqe_params_path(config),
    resolution=model_config.data.resolution,
    provenance=_provenance(config, model_workdir, step),
  )


def clean_from_config(config, workdir: str) -> dict:
  out_dir = config.clean.out_dir or files.join(workdir, 'cleaned')
  _refuse_inside_source(config, out_dir)
  return clean_with_model(config, workdir, out_dir)


def _refuse_inside_source(config, out_dir: str) -> None:
  if config.data.source == 'folder':
    if files.is_within(out_dir, config.data.dir):
      raise ValueError(
        f'clean.out_dir {out_dir!r} is inside the source folder {config.data.dir!r};'
        ' the source is never written to'
      )
