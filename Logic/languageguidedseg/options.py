"""Command-line options that several commands share (``lgseg``'s subcommands, ``lgseg serve``, ``Training/train.py``),
each declared once, the cores their thread and worker defaults share out, and the one ``error:`` line in which a
command line reports an engine error.

Engine messages describe a setting in words, never by a flag (Slicer and the web page have none); the command line
names its flag for the setting an error concerns (:attr:`~languageguidedseg.errors.LgsegError.option`).
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

from .errors import LgsegError


def available_cores() -> int:
    """CPU cores this process may use (respects affinity masks), the base of the thread and worker defaults."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum`` (a usage error otherwise, exit code 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, not '{text}'")
        return value

    return parse


AUTO_MODEL = "auto"  # --model auto: the installed model made for the image (inference.choose_model)


def add_model_option(parser: argparse.ArgumentParser, auto: bool = False) -> None:
    """``--model``: an installed model's name or a model folder; ``auto``: also ``auto``, the default (the
    installed model made for the image), else none means the default model."""
    if auto:
        parser.add_argument("--model", default=AUTO_MODEL,
                            help="model name (see 'lgseg models') or model folder; default: auto, the installed "
                                 "model whose training images the image looks like")
    else:
        parser.add_argument("--model", help="model name (see 'lgseg models') or model folder; default: qata-cxr")


def add_device_option(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--device``: auto, cpu or cuda."""
    parser.add_argument("--device", default=default, choices=("auto", "cpu", "cuda"),
                        help=f"auto (a CUDA GPU when there is one, else the CPU), cpu or cuda; default: {default}")


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """``--json``: one JSON object on stdout instead of text."""
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bar."""
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_sides_option(parser: argparse.ArgumentParser) -> None:
    """``--sides``: what left and right mean in the report given and printed (patient or image)."""
    parser.add_argument("--sides", default="patient", choices=("patient", "image"),
                        help="what left and right mean in the report given and printed: patient (default, the "
                             "patient's sides) or image (the sides of the image as displayed); 2D PNG/JPEG images "
                             "are taken as frontal radiographs in radiological display (the patient's left on the "
                             "image's right)")


def error_line(error: LgsegError, args: argparse.Namespace) -> str:
    """``error: <message>`` on one line; where the error concerns a setting that the command has a flag for (its
    argparse ``dest``), the flag follows in brackets, e.g. ``(--device)``."""
    message = str(error).replace("\r", " ").replace("\n", " ")  # one line, even for odd file names
    if error.option is not None and error.option in vars(args):
        message += f" (--{error.option.replace('_', '-')})"
    return f"error: {message}"
