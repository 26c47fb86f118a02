"""The train state and its split into the checkpoint's items.

A neutral home: the optimiser, the train loop and the checkpoints all use it, and it uses none
of them, so none of them has to import another to know what a state is.
"""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Any
  ema: Any  # EMA of params: what we sample and restore with
  opt_state: Any
  rng: jax.Array  # uint32[2] base key; each step folds in its step number
  # The first step whose loss or gradient norm was not finite (-1: none). Such a step leaves
  # the state untouched, so no NaN ever reaches params, and the loop stops before saving.
  bad_step: jax.Array


def split_state(state: TrainState) -> tuple[dict, Any]:
  """TrainState -> (everything but EMA, EMA params): the checkpoint's `train` and `ema` items,
  kept apart so that inference restores only the EMA."""
  train = dict(
    step=state.step,
    params=state.params,
    opt_state=state.opt_state,
    rng=state.rng,
    bad_step=state.bad_step,
  )
  return train, state.ema


def merge_state(train: dict, ema) -> TrainState:
  """The inverse of split_state."""
  return TrainState(
    step=train['step'],
    params=train['params'],
    ema=ema,
    opt_state=train['opt_state'],
    rng=train['rng'],
    bad_step=train['bad_step'],
  )
