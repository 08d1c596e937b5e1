"""LanguageGuidedSeg engine: language-guided medical image segmentation, with or without a report.

The engine is plain Python (no Qt, no Slicer GUI). It is shared by the ``lgseg`` command line tool,
the 3D Slicer module, ``Training/`` and the tests.
"""

__version__ = "0.1.0"
