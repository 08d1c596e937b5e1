"""Inference: load a model once, then segment 2D images, one slice of a volume, or whole volumes slice by slice."""

from __future__ import annotations

import collections
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .errors import LgsegError
from .laterality import mask_laterality, report_laterality
from .network import LanguageGuidedSegNet, fold_batchnorm, fuse_convolutions
from .package import ModelConfig, ModelPackage, load_package
from .preprocess import PreprocessConfig, prepare_slices, restore_size
from .text import TextEncoder, normalize_report

ProgressCallback = Callable[[int, int], None]
CancelCallback = Callable[[], bool]


class SegmentationCancelled(Exception):
    """Raised between batches when the cancel callback returns True."""


@dataclass
class Approximation:
    """The prototype approximation of a report: the chosen prototype's report and its similarity, plus the top k.

    Where the model's reports name sides, the most similar prototype whose report agrees with the mask that the
    approximation produces is chosen (so the text never names a side the mask avoids), else the nearest one.
    """

    report: str
    similarity: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class SegmentationResult:
    """A binary mask in the input's spatial shape and how it was obtained."""

    mask: np.ndarray
    report: str
    report_source: str  # "given" or "prototype"
    seconds: float
    similarity: Optional[float] = None

    @property
    def foreground_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LgsegError("CUDA was requested but no CUDA GPU is available to PyTorch; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise LgsegError(f"unknown device '{device}'; choose auto, cpu or cuda")
    return torch.device(device)


def slices_of(array: np.ndarray, rgb: bool, axis: int) -> np.ndarray:
    """View a 2D image ``(y, x[, 3])`` or volume ``(z, y, x[, 3])`` as a stack of 2D slices along an IJK axis.

    ``axis`` follows ITK / Slicer IJK order (0 = i, 1 = j, 2 = k); numpy's axis is ``2 - axis`` for volumes.
    """
    spatial = array.ndim - (1 if rgb else 0)
    if spatial == 2:
        return array[None]
    if spatial != 3:
        raise LgsegError(f"cannot segment an image with {spatial} spatial dimensions; give a 2D image or a 3D volume")
    if axis not in (0, 1, 2):
        raise LgsegError(f"--axis must be 0, 1 or 2 (IJK order), not {axis}")
    return np.moveaxis(array, 2 - axis, 0)


def available_cores() -> int:
    """CPU cores this process may use (respects affinity masks and container limits where visible)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Segmenter:
    """A loaded model that segments images; load once, call many times."""

    def __init__(self, model: Union[str, os.PathLike, ModelPackage, None] = None, device: str = "auto",
                 threads: Optional[int] = None, batch_size: Optional[int] = None):
        self.package = model if isinstance(model, ModelPackage) else load_package(model)
        self.device = resolve_device(device)
        # A thread count the user set with OMP_NUM_THREADS is kept (torch reads it at import).
        if self.device.type == "cpu" and (threads or not os.environ.get("OMP_NUM_THREADS")):
            torch.set_num_threads(threads or available_cores())
        self.preprocess = PreprocessConfig.from_dict(self.package.config.preprocessing, "preprocessing")
        self.network = fold_batchnorm(self.package.build_network(self.device)).to(memory_format=torch.channels_last)
        if self.device.type == "cpu":
            self.network = fuse_convolutions(self.network, self.preprocess.size)
        self.batch_size = batch_size or (16 if self.device.type == "cuda" else 4)
        self._text_encoder: Optional[TextEncoder] = None

    @classmethod
    def from_network(cls, network: LanguageGuidedSegNet, config: ModelConfig, device: torch.device,
                     text_encoder: Optional[TextEncoder] = None, batch_size: int = 32) -> "Segmenter":
        """A segmenter over a network in memory, e.g. one being trained: used as it is (no folding or fusion, its
        weights shared), so that validation during training runs the same code as ``lgseg evaluate``."""
        segmenter = cls.__new__(cls)
        segmenter.package = ModelPackage(path=Path(), config=config, state_dict={}, weights_sha256="")
        segmenter.device = device
        segmenter.preprocess = PreprocessConfig.from_dict(config.preprocessing, "preprocessing")
        segmenter.network = network
        segmenter.batch_size = batch_size
        segmenter._text_encoder = text_encoder
        return segmenter

    @functools.cached_property
    def _prototype_sides(self) -> Optional[list[Optional[str]]]:
        """Laterality of each prototype's report where the model's reports name sides (QaTa scheme): the
        approximated report is then the most similar prototype that agrees with the mask it produced."""
        config = self.package.config
        if config.report_parser != "qata" or len(config.prototype_reports) != self.network.bank.size:
            return None
        return [report_laterality(report) for report in config.prototype_reports]

    @property
    def text_encoder(self) -> TextEncoder:
        """The package's text encoder, loaded on first use (a run without a report never loads it)."""
        if self._text_encoder is None:
            config = self.package.config
            encoder = TextEncoder(config.text_encoder, max_tokens=config.max_tokens)
            if encoder.dim != config.network.text_dim:
                raise LgsegError(f"text encoder '{config.text_encoder}' gives {encoder.dim}-d tokens but model "
                                 f"'{self.package.name}' expects {config.network.text_dim}; "
                                 "use the model's own encoder")
            self._text_encoder = encoder
        return self._text_encoder

    def _guidance(self, report: Optional[str]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        text = normalize_report(report)
        if text is None:
            return None
        encoding = self.text_encoder.encode([text]).to(self.device)
        return encoding.tokens, encoding.mask

    @torch.inference_mode()
    def predict_slices(self, slices: np.ndarray, report: Union[str, None, Sequence[Optional[str]]] = None,
                       progress: Optional[ProgressCallback] = None,
                       cancel: Optional[CancelCallback] = None) -> tuple[np.ndarray, list[int], list[float]]:
        """Foreground probabilities ``[N, H, W]`` for a stack of slices ``[N, H, W(, 3)]``.

        ``report`` is one report for every slice, or a sequence of one report per slice (e.g. a batch of different
        images); None or an empty report means the prototype bank guides that slice. Returns the probabilities and,
        in prototype mode (``report`` None or empty), each slice's approximated report as a prototype index and its
        similarity (see :class:`Approximation`); with a sequence of reports, slices that had a report get -1 and NaN.
        """
        total = slices.shape[0]
        per_slice = report is not None and not isinstance(report, str)
        if per_slice:
            texts = [normalize_report(r) for r in report]
            if len(texts) != total:
                raise ValueError(f"got {len(texts)} reports for {total} slices; give one report per slice")
            guidance = None
        else:
            guidance = self._guidance(report)
        probabilities = np.empty(slices.shape[:3], dtype=np.float32)
        nearest, similarity = [], []
        for start in range(0, total, self.batch_size):
            if cancel is not None and cancel():
                raise SegmentationCancelled()
            batch = slices[start:start + self.batch_size]
            images = prepare_slices(batch, self.preprocess).to(self.device, memory_format=torch.channels_last)
            if per_slice:
                out = self._mixed_forward(images, texts[start:start + len(batch)])
                logits = out["logits"]
            elif guidance is None:
                out = self.network(images, return_features=True)
                logits = out["logits"]
            else:
                tokens, mask = guidance
                logits = self.network(images, tokens.expand(len(batch), -1, -1), mask.expand(len(batch), -1))
            probs = restore_size(torch.sigmoid(logits.float()), batch.shape[1:3]).cpu().numpy()
            probabilities[start:start + len(batch)] = probs
            if per_slice or guidance is None:
                bank_rows = [i for i in range(len(batch)) if not per_slice or texts[start + i] is None]
                ranked = self._rank_prototypes(out["image_features"][bank_rows], probs[bank_rows])
                best = dict(zip(bank_rows, (pairs[0] for pairs in ranked)))
                nearest += [best[i][0] if i in best else -1 for i in range(len(batch))]
                similarity += [best[i][1] if i in best else float("nan") for i in range(len(batch))]
            if progress is not None:
                progress(min(start + len(batch), total), total)
        return probabilities, nearest, similarity

    def _mixed_forward(self, images: torch.Tensor, texts: Sequence[Optional[str]]) -> dict:
        """The network's outputs for a batch where each image has its own report (None: the prototype bank guides it).

        One forward: the network takes report tokens per sample and the bank's tokens where ``use_bank`` is set.
        """
        use_bank = torch.tensor([t is None for t in texts], device=self.device)
        given = [i for i, t in enumerate(texts) if t is not None]
        if not given:
            out = self.network(images, return_features=True)
        else:
            encoding = self.text_encoder.encode([str(texts[i]) for i in given]).to(self.device)
            tokens = encoding.tokens.new_zeros((len(texts),) + tuple(encoding.tokens.shape[1:]))
            mask = encoding.mask.new_zeros((len(texts), encoding.mask.shape[1]))
            tokens[given], mask[given] = encoding.tokens, encoding.mask
            mask[use_bank, 0] = True  # a placeholder token; these rows take the bank's tokens instead
            out = self.network(images, tokens, mask, use_bank=use_bank, return_features=True)
        return out

    def _rank_prototypes(self, image_features: torch.Tensor, probabilities: np.ndarray) -> list[list[tuple[int, float]]]:
        """Every prototype per slice as (index, similarity), most similar first; where the model's reports name
        sides, the prototypes whose report agrees with the slice's mask come first (similarity order within)."""
        if not len(probabilities):
            return []
        bank = self.network.bank
        query = bank.query(self.network.image_embedding(image_features), top_k=bank.size)
        threshold, sides = self.package.config.threshold, self._prototype_sides
        ranked = []
        for indices, sims, slice_probabilities in zip(query.indices.tolist(), query.similarities.tolist(),
                                                      probabilities):
            pairs = list(zip(indices, sims))
            side = mask_laterality(slice_probabilities > threshold) if sides else None
            if sides and side is not None:
                pairs.sort(key=lambda pair: sides[pair[0]] != side)  # a stable sort: similarity order within
            ranked.append(pairs)
        return ranked

    def segment_array(self, array: np.ndarray, *, rgb: bool = False, report: Optional[str] = None, axis: int = 2,
                      slice_index: Optional[int] = None, threshold: Optional[float] = None,
                      progress: Optional[ProgressCallback] = None,
                      cancel: Optional[CancelCallback] = None) -> SegmentationResult:
        """Segment a numpy image in SimpleITK order: ``(y, x)`` or ``(z, y, x)``, plus a channel axis if ``rgb``.

        With ``slice_index`` only that slice along ``axis`` (IJK order) is segmented; the rest of the mask is 0.
        An empty report means no report: the prototype bank supplies the guidance and the approximated report.
        """
        started = time.perf_counter()
        threshold = self.package.config.threshold if threshold is None else threshold
        if not 0.0 < threshold < 1.0:
            raise LgsegError(f"threshold must lie between 0 and 1, not {threshold}")
        if array.size == 0:
            raise LgsegError("the image is empty (a dimension of size 0); give a non-empty image")
        stack = slices_of(array, rgb, axis)
        spatial_shape = array.shape[:-1] if rgb else array.shape
        mask = np.zeros(spatial_shape, dtype=np.uint8)
        mask_stack = slices_of(mask, False, axis)  # a view: writing into it fills ``mask``
        if slice_index is not None:
            if not 0 <= slice_index < stack.shape[0]:
                raise LgsegError(f"slice {slice_index} is outside the image (0..{stack.shape[0] - 1} along axis {axis})")
            stack, target = stack[slice_index:slice_index + 1], slice(slice_index, slice_index + 1)
        else:
            target = slice(None)
        probabilities, nearest, similarity = self.predict_slices(stack, report, progress, cancel)
        mask_stack[target] = probabilities > threshold
        text = normalize_report(report)
        if text is not None:
            return SegmentationResult(mask, text, "given", time.perf_counter() - started)
        # The approximated report shown to the user: the prototype nearest to most slices.
        index = collections.Counter(nearest).most_common(1)[0][0]
        sims = [s for n, s in zip(nearest, similarity) if n == index]
        return SegmentationResult(mask, self.prototype_report(index), "prototype", time.perf_counter() - started,
                                  similarity=float(np.mean(sims)))

    def approximated_reports(self, slices: np.ndarray) -> list[str]:
        """The approximated report of each slice of a stack ``[N, H, W(, 3)]`` (no report given)."""
        return [self.prototype_report(index) for index in self.predict_slices(slices)[1]]

    def prototype_report(self, index: int) -> str:
        reports = self.package.config.prototype_reports
        return reports[index] if index < len(reports) else f"prototype {index}"

    @torch.inference_mode()
    def approximate(self, array: np.ndarray, *, rgb: bool = False, axis: int = 2,
                    slice_index: Optional[int] = None, top_k: Optional[int] = None) -> Approximation:
        """The prototype approximation of a 2D image (or one slice; default the middle one) as a report."""
        stack = slices_of(array, rgb, axis)
        index = stack.shape[0] // 2 if slice_index is None else slice_index
        if not 0 <= index < stack.shape[0]:
            raise LgsegError(f"slice {index} is outside the image (0..{stack.shape[0] - 1} along axis {axis})")
        one = stack[index:index + 1]
        images = prepare_slices(one, self.preprocess).to(self.device, memory_format=torch.channels_last)
        out = self.network(images, return_features=True)
        probabilities = restore_size(torch.sigmoid(out["logits"].float()), one.shape[1:3]).cpu().numpy()
        ranked = self._rank_prototypes(out["image_features"], probabilities)[0][:top_k or self.network.bank.top_k]
        top = [(self.prototype_report(i), float(s)) for i, s in ranked]
        return Approximation(report=top[0][0], similarity=top[0][1], top=top)
