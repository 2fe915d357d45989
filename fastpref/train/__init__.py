"""The thin trainer: packed forward, data, reference cache, training loop."""
