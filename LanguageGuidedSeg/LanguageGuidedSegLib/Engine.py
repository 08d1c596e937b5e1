"""Finding and importing the engine (``languageguidedseg``) from the module: shipped beside it, or a checkout's
``Logic/`` folder."""

import importlib
import os
import sys

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def enginePaths():
    """Folders that may hold the ``languageguidedseg`` package, most specific first: next to the module (where CMake
    installs it) or the repository's Logic/ folder (a source checkout)."""
    return [MODULE_DIR, os.path.join(os.path.dirname(MODULE_DIR), "Logic")]


def importEngine(name=""):
    """Import ``languageguidedseg`` (or one of its submodules), adding its folder to ``sys.path`` if needed.

    The engine's parameters, controller, model list and MRML bridge import neither torch nor Qt; only a run imports
    torch.
    """
    for folder in enginePaths():
        if os.path.isfile(os.path.join(folder, "languageguidedseg", "__init__.py")):
            if folder not in sys.path:
                # In front, so the engine shipped with this module wins over any other installed copy.
                sys.path.insert(0, folder)
            break
    return importlib.import_module("languageguidedseg" + ("." + name if name else ""))
