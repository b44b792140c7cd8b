"""The training loop, its checkpoints and the events it publishes."""
