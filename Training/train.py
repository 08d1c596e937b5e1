"""Train a LanguageGuidedSeg model package.

    python Training/train.py --config Training/configs/qata-cxr.yaml [--data DIR] [--text-ratio R] [--epochs N]
        [--batch-size B] [--limit N] [--output MODEL_DIR] [--resume] [--set KEY=VALUE ...]
    torchrun --nproc_per_node=2 Training/train.py --config ...     (distributed data-parallel; gloo on CPU)
    python Training/train.py --config CONFIG --describe-domain MODEL_DIR   (no training: add the description of
        its images to an existing package, see training/domain.py)
    python Training/train.py --config FINE_TUNE_CONFIG --interpolate MODEL_DIR [--interpolate-weight W] --output OUT
        (no training: the weights between the config's init_from and its fine-tune MODEL_DIR, WiSE-FT)

Images with a report train with report tokens, images without one (and a random share of those with one) with
prototype tokens from the bank, so one model serves both modes. The first ``bank.warmup_epochs`` epochs warm up
the image-text embedding contrastively on the samples that have reports; then k-means builds the bank (ProLearn),
whose text halves are fine-tuned by the segmentation loss and whose image keys follow the encoder every epoch.

Every epoch validates in both modes, keeps the best model (by the mean of both Dice scores) as a model package in
``--output``, and writes a checkpoint atomically beside it (``<output>-training/``), with the log, the curves and a
grid of validation cases. ``--resume`` continues from the last checkpoint with the same result as an uninterrupted
run: every random draw is derived from (seed, epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import torch

from languageguidedseg.errors import LgsegError
from languageguidedseg.extras import missing_optional
from languageguidedseg.options import at_least, error_line

try:
    from training.config import REPO_ROOT, load_config
    from training.domain import describe_package
    from training.loop import Trainer
    from training.runtime import Runtime
except ImportError as error:  # installed without the [training] extra: one line, no traceback
    missing = missing_optional(error)
    if missing is None:
        raise
    print(f"error: training needs the optional package '{missing[0]}'; install the training extra "
          "with pip install -e '.[training]'", file=sys.stderr)
    sys.exit(2)

# Command-line options that override a config key.
OVERRIDES = {"data": "data.path", "text_ratio": "data.text_ratio", "limit": "data.limit",
             "epochs": "optimisation.epochs", "batch_size": "optimisation.batch_size", "seed": "seed",
             "threads": "threads", "workers": "data.workers"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. Training/configs/qata-cxr.yaml")
    parser.add_argument("--data", help="dataset folder (overrides the config)")
    parser.add_argument("--text-ratio", type=float, help="fraction of training reports kept, e.g. 0.01")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--limit", type=at_least(1), help="use only N training (and at most N validation) images")
    parser.add_argument("--output", help="model package folder (default Training/runs/<name>/model)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=at_least(1), help="CPU threads per process (default: cores / processes)")
    parser.add_argument("--workers", type=at_least(0), help="DataLoader worker processes (default: the config's)")
    parser.add_argument("--stop-after", type=at_least(1), metavar="N",
                        help="stop after N epochs of this run (continue later with --resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    parser.add_argument("--describe-domain", metavar="MODEL_DIR",
                        help="do not train: describe the images of the existing model package MODEL_DIR from the "
                             "config's data set (train split; threshold calibrated on the val split) and rewrite "
                             "the package with the same weights (what a training run does when it finishes)")
    parser.add_argument("--interpolate", metavar="MODEL_DIR",
                        help="do not train: write to --output the package whose weights lie between the config's "
                             "init_from and MODEL_DIR, a fine-tune of it (WiSE-FT), validated and described as a run's")
    parser.add_argument("--interpolate-weight", type=float, metavar="W",
                        help="with --interpolate: the fine-tune's share of the interpolated weights (default 0.5)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="override any config key, e.g. --set losses.tevia_alignment=0 (the value is read as "
                             "YAML; repeatable; for ablations)")
    return parser.parse_args(argv)


def parse_settings(settings: list[str]) -> dict[str, object]:
    """``--set`` items as dotted config keys and YAML values; the config's own checks then apply to them."""
    import yaml

    parsed: dict[str, object] = {}
    for item in settings:
        key, equals, text = item.partition("=")
        if not equals or not key.strip():
            raise LgsegError(f"--set {item!r} is not KEY=VALUE; give e.g. --set losses.tevia_alignment=0")
        try:
            parsed[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise LgsegError(f"--set {key.strip()}: the value is not valid YAML; quote it") from exc
    return parsed


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.interpolate_weight is not None and not args.interpolate:
            raise LgsegError("--interpolate-weight needs --interpolate MODEL_DIR (the fine-tune to mix with init_from)")
        overrides = parse_settings(args.settings)
        overrides.update({key: getattr(args, option) for option, key in OVERRIDES.items()
                          if getattr(args, option) is not None})
        config = load_config(Path(args.config), overrides)
        if args.describe_domain:
            described = describe_package(Path(args.describe_domain), config.data, config.package.domain_images,
                                         "cuda" if torch.cuda.is_available() else "cpu")
            print(f"described {args.describe_domain}: {json.dumps(described.to_dict())}")
            return 0
        output = Path(args.output) if args.output else REPO_ROOT / "Training" / "runs" / config.name / "model"
        runtime = Runtime.from_environment(config.amp, config.threads, show_progress=not args.no_progress)
        launcher = f"torchrun --nproc_per_node={runtime.world} " if runtime.distributed else "python "
        command = launcher + " ".join(shlex.quote(a) for a in sys.argv)
        trainer = Trainer(config, output.resolve(), command, runtime)
        if args.interpolate:
            weight = 0.5 if args.interpolate_weight is None else args.interpolate_weight
            trainer.interpolate(Path(args.interpolate), weight)
        else:
            trainer.fit(args.resume, args.stop_after)
        runtime.log(f"model package: {output}")
        return 0
    except LgsegError as exc:
        print(error_line(exc, args), file=sys.stderr)
        return 2


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun a rank can hang at interpreter shutdown in c10d's background threads once the other ranks
        # have gone (seen with gloo); everything is written and the process group left, so exit directly.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
