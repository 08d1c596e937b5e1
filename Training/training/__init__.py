"""Training LanguageGuidedSeg models; the entry point is ``Training/train.py``.

Modules, one job each: ``config`` (the run's settings, strictly from YAML), ``data`` (splits, reports, sampling),
``edits`` (report edits: reports that name part of a case, with the target restricted to it), ``augment`` (geometry
and appearance augmentation), ``losses`` (the training objective), ``bank`` (ProLearn's prototype bank during
training), ``optim`` (AdamW and its schedule), ``loop`` (the training loop, validation, checkpoints), ``export``
(model package, log and figures), ``runtime`` (device and processes).
"""
