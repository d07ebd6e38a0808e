"""Gradients at activations: the ``actgrad`` job's hooks on decoder-layer outputs (``actgrad_run``) and the
per-vocabulary-token gradients at the embedding output that training records (``embgrad``). Imports torch."""
