"""train_state: the split into the checkpoint's items, and back."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from idm_jax.training import train_state


def _state():
  return train_state.TrainState(
    step=jnp.int32(7),
    params={'w': jnp.arange(3.0)},
    ema={'w': jnp.ones(3)},
    opt_state=({'mu': jnp.zeros(3)},),
    rng=jnp.array([1, 2], jnp.uint32),
    bad_step=jnp.int32(-1),
  )


def test_split_keeps_the_ema_apart_and_merge_inverts_it():
  state = _state()
  train, ema = train_state.split_state(state)
  assert 'ema' not in train and ema is state.ema  # inference restores only this item
  # Every other field is in the train item: a new field missed here would not be saved.
  fields = {f.name for f in dataclasses.fields(train_state.TrainState)}
  assert set(train) == fields - {'ema'}
  back = train_state.merge_state(train, ema)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(back) == jax.tree.structure(state)
