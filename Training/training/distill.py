"""Distillation: the averaged no-report probabilities of an ensemble of trained model packages (the teachers) on the
training images, as soft targets for the steps that train the no-report mode.

Each teacher segments each training image as ``lgseg`` does without a report (its own zoomed and mirrored views, its
mask kept to the side its approximated report names), so the student learns the ensemble's answer, and the side
figures of the approximated report, which are read from the no-report probabilities, follow it. The targets are
computed once per run and kept in the run folder, keyed by the teachers' weights and the training images, so that
``--resume`` does not compute them again.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from languageguidedseg.data import Sample, load_pair
from languageguidedseg.errors import LgsegError
from languageguidedseg.fileio import atomic_path
from languageguidedseg.inference import Segmenter
from languageguidedseg.package import WEIGHTS_FILE, ModelPackage, load_package

from .config import repository_path
from .runtime import Runtime

CACHE_FILE = "soft_targets.pt"


def _digest(teachers: list[ModelPackage], samples: list[Sample], size: int) -> str:
    """What the targets depend on: each teacher's weights, the training images (in order) and the input size."""
    hasher = hashlib.sha256(str(size).encode())
    for teacher in teachers:
        hasher.update(teacher.weights_sha256.encode())  # checked against the weights by load_package
    for sample in samples:
        hasher.update(str(sample.image_path).encode())
    return hasher.hexdigest()


def soft_targets(samples: list[Sample], teachers: list[str], size: int, run_dir: Path,
                 runtime: Runtime) -> torch.Tensor:
    """The teachers' averaged no-report probabilities ``[N, 1, size, size]`` (float16) of ``samples``, on the
    network's input grid; from ``run_dir``'s cache when it was computed for the same teachers and images."""
    from tqdm import tqdm

    paths = [repository_path(folder) for folder in teachers]
    for folder, path in zip(teachers, paths):
        if not (path / WEIGHTS_FILE).is_file():
            raise LgsegError(f"distillation teacher '{folder}' is not a model package folder; give the folder of a "
                             "trained model (model.json and model.safetensors)")
    packages = [load_package(path) for path in paths]
    digest = _digest(packages, samples, size)
    cache = run_dir / CACHE_FILE
    if cache.is_file():
        stored = torch.load(cache, map_location="cpu", weights_only=True)
        if stored.get("digest") == digest:
            return stored["targets"]
    if runtime.main:
        started = time.perf_counter()
        total = torch.zeros(len(samples), 1, size, size)
        for package in packages:
            segmenter = Segmenter.load(package, device=runtime.device.type)
            for i, sample in enumerate(tqdm(samples, desc=f"soft targets: {package.path.name}", file=sys.stderr,
                                            disable=not runtime.show_progress, leave=False)):
                image, _ = load_pair(sample)
                probabilities = segmenter.predict_slices(image[None], None).probabilities
                total[i] += F.interpolate(torch.from_numpy(probabilities)[None], size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)[0]
        targets = (total / len(paths)).clamp(0.0, 1.0).half()
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            torch.save({"digest": digest, "teachers": [str(p) for p in paths], "targets": targets}, tmp)
        runtime.log(f"soft targets: {len(samples)} training images, the average of {len(paths)} teachers "
                    f"({time.perf_counter() - started:.0f} s)")
    runtime.barrier()  # the other processes read what the main one wrote
    return torch.load(cache, map_location="cpu", weights_only=True)["targets"]
