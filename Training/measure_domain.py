"""Measure the applicability check of model packages on images they were and were not made for.

    python Training/measure_domain.py [--model NAME=DATASET ...] [--data DIR] [--json FILE]

For each model (default: the shipped ``qata-cxr=qata-cov19`` and ``kvasir-polyp=kvasir-seg``), the share of images
judged in its domain (``in_domain_rate``) on its own data set's val split (target >= 0.99) and on images it was not
made for (target <= 0.01): the other models' val splits, every axial slice of both CT examples in
``DIR/ct-examples``, its own val images inverted (a negative, as a mis-read MONOCHROME1 DICOM gives) and synthetic
images (noise, flat, gradients; grey and colour); then ``--model auto``'s choice among these models on each val
split (target >= 0.99 correct). Prints a Markdown table (Training/README.md and the model cards hold its output).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from languageguidedseg.data import load_pair, load_split
from languageguidedseg.errors import LgsegError
from languageguidedseg.imageio import image_array, read_image
from languageguidedseg.inference import Segmenter, choose_model
from languageguidedseg.options import error_line

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("qata-cxr=qata-cov19", "kvasir-polyp=kvasir-seg")
CT_EXAMPLES = ("ct.nii.gz", "ct-dicom")
SIZE = 224


def synthetic_images() -> list[np.ndarray]:
    """Noise, flat and gradient images, each grey and in colour (26 in all, seeded)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.0, 255.0, SIZE)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    grey = [rng.uniform(0, 255, (SIZE, SIZE)) for _ in range(3)]
    grey += [np.clip(rng.normal(128, 40, (SIZE, SIZE)), 0, 255) for _ in range(3)]
    grey += [np.full((SIZE, SIZE), value) for value in (0.0, 128.0, 255.0)]
    grey += [np.tile(ramp, (SIZE, 1)), np.tile(ramp[:, None], (1, SIZE)), (yy + xx) * 255.0 / (2 * SIZE - 2),
             255.0 * np.hypot(yy - SIZE / 2, xx - SIZE / 2) / np.hypot(SIZE / 2, SIZE / 2)]
    colour = [np.stack([image * weight for weight in rng.uniform(0.3, 1.0, 3)], axis=-1) for image in grey]
    return [image.astype(np.uint8) for image in grey + colour]


def ct_slices(root: Path) -> list[np.ndarray]:
    """Every axial slice of the CT examples."""
    slices: list[np.ndarray] = []
    for name in CT_EXAMPLES:
        volume = image_array(read_image(root / "ct-examples" / name))
        slices += list(volume)
    return slices


def val_images(root: Path) -> list[np.ndarray]:
    return [load_pair(sample)[0] for sample in load_split(root, "val")]


def in_domain_rate(segmenter: Segmenter, images: Sequence[np.ndarray]) -> float:
    """The share of ``images`` that the model judges in its domain (one image at a time: sizes differ)."""
    assert segmenter.domain is not None
    threshold = segmenter.domain.config.threshold
    scores = np.concatenate([segmenter.domain_scores(image[None]) for image in images])
    return float((scores >= threshold).mean())


def measure(models: dict[str, str], data: Path) -> dict[str, dict[str, float]]:
    """``{model: {image set: in_domain_rate}}`` and ``{"auto": {data set: share chosen right}}``."""
    load = functools.cache(functools.partial(Segmenter.load, device="cpu"))
    vals = {dataset: val_images(data / dataset) for dataset in set(models.values())}
    shared = {"ct-examples (all axial slices)": ct_slices(data), "synthetic": synthetic_images()}
    figures: dict[str, dict[str, float]] = {}
    for name, dataset in models.items():
        segmenter = load(name)
        if segmenter.domain is None:
            raise LgsegError(f"model '{name}' has no domain description; add one with Training/train.py "
                             "--describe-domain")
        sets = {f"{dataset} val (own)": vals[dataset], f"{dataset} val inverted": [255 - i for i in vals[dataset]]}
        sets.update({f"{other} val": images for other, images in vals.items() if other != dataset})
        sets.update(shared)
        figures[name] = {label: round(in_domain_rate(segmenter, images), 4) for label, images in sets.items()}
        figures[name]["threshold"] = segmenter.domain.config.threshold
    auto = {}
    for name, dataset in models.items():
        chosen = []
        for image in vals[dataset]:
            try:
                chosen.append(choose_model(image, rgb=image.ndim == 3, load=load, models=list(models))[0])
            except LgsegError:  # no model fits the image
                chosen.append("")
        auto[f"{dataset} val -> {name}"] = round(float(np.mean([c == name for c in chosen])), 4)
    figures["auto"] = auto
    return figures


def table(figures: dict[str, dict[str, float]]) -> str:
    lines = ["| model | images | in_domain_rate | target |", "|---|---|---|---|"]
    for name, rates in figures.items():
        if name == "auto":
            continue
        for label, rate in rates.items():
            if label != "threshold":
                lines.append(f"| {name} | {label} | {rate:.4f} | {'>= 0.99' if '(own)' in label else '<= 0.01'} |")
    for label, rate in figures["auto"].items():
        lines.append(f"| `--model auto` | {label} | {rate:.4f} (chosen right) | >= 0.99 |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", metavar="NAME=DATASET",
                        help="a model and its data set's folder name under --data (repeatable; default: the shipped "
                             "models)")
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"), help="the data folder")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        pairs = [item.split("=", 1) for item in (args.model or SHIPPED)]
        if any(len(pair) != 2 for pair in pairs):
            raise LgsegError("give each model as NAME=DATASET, e.g. qata-cxr=qata-cov19")
        figures = measure(dict(pairs), Path(args.data))
    except LgsegError as exc:
        print(error_line(exc, args), file=sys.stderr)
        return 2
    print(table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
