"""Benchmarks (speed), run as modules from the repository root: python -m bench.train_step ...

Also the two scripts for a lent GPU (gpu_check.sh: accelerator tests and speed; gpu_session.sh:
the 128 px quality run and the speed check in one call). The scripts that produce the quality
results of docs/RESULTS.md live in experiments/.
"""
