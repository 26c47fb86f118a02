"""What every run is set up with: the config schema, the flag dialect of the commands, the device mesh and multi-host helpers."""
