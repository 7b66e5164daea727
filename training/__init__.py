"""Training of NeuroHorizon models: a compact plain-PyTorch loop.

- :mod:`training.data`: recordings held in memory, (session, window) sampling,
  session splits, next-second targets and history counts.
- :mod:`training.train`: the loop (AdamW, warm-up + cosine schedule, gradient
  clipping, bf16 autocast on CUDA, DistributedDataParallel under ``torchrun``),
  validation, atomic checkpoints and ``--resume``; ``python -m training.train``
  or ``nh-serve train``.
- ``training/configs/*.json``: named training configurations.
"""
