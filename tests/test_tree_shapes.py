"""tree_shapes.mismatches: the one wording for weights that do not fit a model."""

from idm_jax.runtime import tree_shapes


def test_fitting_arrays_have_no_problems():
  assert tree_shapes.mismatches({'a': (2, 3), 'b': (4,)}, {'b': [4], 'a': (2, 3)}) == []


def test_each_kind_of_problem_is_counted_with_examples():
  problems = tree_shapes.mismatches(
    {'a': (2, 3), 'b': (4,), 'c': (1,)}, {'a': (3, 2), 'b': (4,), 'd': (5,)}
  )
  assert problems == [
    "1 missing (e.g. ['c'])",
    "1 unexpected (e.g. ['d'])",
    "1 with wrong shapes (e.g. ['a: got (3, 2), expected (2, 3)'])",
  ]
