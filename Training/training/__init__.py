"""Training LanguageGuidedSeg models; the entry point is ``Training/train.py``.

Modules, one job each: ``config`` (the run's settings, strictly from YAML), ``data`` (splits, reports, sampling),
``augment`` (geometry and appearance augmentation), ``bank`` (ProLearn's prototype bank during training), ``optim``
(AdamW and its schedule), ``loop`` (the training loop, validation, checkpoints), ``export`` (model package, log and
figures), ``runtime`` (device and processes).
"""
