"""Using a trained model: loading it and its sampler (engine), the export file, the evaluate/sample/generate modes, face alignment."""
