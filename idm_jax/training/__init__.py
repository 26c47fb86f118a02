"""Training a model: the train state, the optimiser, the step and the loop, checkpoints, the run log."""
