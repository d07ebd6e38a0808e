"""The language-model side of training: models and LoRA (``models``), data and tasks (``data``, ``tasks``),
token categories, evaluation, the token-weighting schemes (``schemes``, torch-free ``scheme_specs``) and their
loss (``loss``), the training loop (``trainer``) and torchrun helpers (``dist``). Everything here but
``tasks``, ``categories`` and ``scheme_specs`` imports torch.
"""
