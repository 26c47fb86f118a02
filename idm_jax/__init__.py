"""IDM (Zhao et al., ICCV 2023) in JAX/Flax: face restoration with iterative diffusion models."""

__version__ = '0.1.0'  # the one place; setup.cfg reads it
