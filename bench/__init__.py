"""Benchmarks (speed), run as modules from the repository root: python -m bench.train_step ...

Experiment scripts that produce docs/RESULTS.md sit beside them; see each file's docstring.
"""
