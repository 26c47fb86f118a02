"""The extrinsic method: cleaning a dataset with a model, the dataset versions it writes, the rounds, and scoring a cleaning against ground truth."""
