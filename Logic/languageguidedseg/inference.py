"""Inference: load a model once, then segment 2D images, one slice of a volume, or whole volumes slice by slice."""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, TypedDict, Union

import numpy as np
import torch

from .config import FLIP_AXES, ModelConfig
from .consistency import ReportCheck
from .domain import Applicability, Domain, judge
from .errors import LgsegError
from .fileio import PathLike
from .fusion import fold_batchnorm, fuse_convolutions
from .laterality import keep_to_side, probability_laterality, report_laterality
from .network import LanguageGuidedSegNet
from .package import ModelPackage, load_package
from .preprocess import prepare_slices, restore_size, zoom
from .sides import Geometry, Orientation, check_sides, orientation_of, result_sides, sides_label, translate_report
from .text import TextEncoder, encoder_version, normalize_report

# Compiling the convolutions for the CPU (fuse_convolutions) costs about as much as 10 to 30 slices take to segment
# and saves a fraction of each later slice, so a Segmenter compiles once it has been given this many slices: a volume
# compiles at once, the Slicer module's live updates after a few edits, a one-image command never.
FUSE_AFTER_SLICES = 16

ProgressCallback = Callable[[int, int], None]
CancelCallback = Callable[[], bool]


class SegmentationCancelled(Exception):  # noqa: N818 - a request the user made, not an error
    """Raised between batches when the cancel callback returns True."""


@dataclass
class Approximation:
    """The prototype approximation of a report: the chosen prototype's report and its similarity, plus the top k.

    Where the model's reports name sides, the most similar prototype whose report names the sides where the
    no-report probabilities say foreground lies is chosen, else the nearest one; the mask keeps to a side that the
    report names alone (``keep_to_side``), so the text never names one side while the mask lies on the other.
    Reports are in the ``sides`` convention ("patient", "image", or "none" for models whose reports name no patient
    sides); ``orientation`` says where the image's orientation came from, ``sides_label`` says both in one line.
    For an image outside the model's domain (``in_domain`` False) no report is approximated: ``report`` is "",
    ``similarity`` None and ``top`` empty, and ``domain_warning`` says why (see :mod:`domain`).
    """

    report: str
    similarity: Optional[float]
    top: list[tuple[str, float]] = field(default_factory=list)
    sides: str = "image"
    orientation: str = ""
    sides_label: str = ""
    in_domain: Optional[bool] = None  # None: applicability unknown (a package without a domain description)
    domain_score: Optional[float] = None
    domain_slices: Optional[tuple[int, int]] = None
    domain_warning: str = ""


class DomainFields(TypedDict):
    """Whether the image is in the model's domain (the results' ``domain_*`` fields; see :mod:`domain`)."""

    in_domain: Optional[bool]
    domain_score: Optional[float]
    domain_slices: Optional[tuple[int, int]]
    domain_warning: str


def domain_fields(applicability: Applicability) -> DomainFields:
    """A result's ``domain_*`` fields from a judgement of applicability."""
    return DomainFields(in_domain=applicability.in_domain, domain_score=applicability.score,
                        domain_slices=applicability.slices, domain_warning=applicability.warning)


class SidesFields(TypedDict):
    """What left and right mean in a result's report, and where the image's orientation came from."""

    sides: str
    orientation: str
    sides_label: str


@dataclass
class SegmentationResult:
    """A binary mask in the input's spatial shape and how it was obtained.

    The ``domain_*`` fields are as in :class:`Approximation`; for a volume ``domain_score`` is the median of the
    slices' scores and ``domain_slices`` (slices in-domain, slices judged). Without a report, an image outside the
    model's domain still gets its mask (the user asked for it) but no approximated report: ``report`` is "",
    ``similarity`` None.
    """

    mask: np.ndarray
    report: str
    report_source: str  # "given" or "prototype"
    seconds: float
    similarity: Optional[float] = None
    sides: str = "image"  # the convention of ``report`` (see Approximation)
    orientation: str = ""
    sides_label: str = ""
    in_domain: Optional[bool] = None
    domain_score: Optional[float] = None
    domain_slices: Optional[tuple[int, int]] = None
    domain_warning: str = ""
    # Where the given report contradicts the slice segmented without it, in the words of ``sides``
    # (consistency.py); empty when they agree, without a report, for a volume, or where reports name no sides.
    report_warnings: list[str] = field(default_factory=list)

    @property
    def foreground_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


class SlicePredictions(NamedTuple):
    """What :meth:`Segmenter.predict_slices` gives for a stack of N slices."""

    probabilities: np.ndarray  # [N, H, W] foreground probabilities
    nearest: list[int]  # bank-guided slices: the approximated report's prototype index; -1 for slices with a report
    similarity: list[float]  # and its similarity; NaN for slices with a report
    domain_scores: np.ndarray  # [N] each slice's domain score (domain.py); NaN where the model has no description


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LgsegError("CUDA was requested but no CUDA GPU is available to PyTorch; choose the device cpu or auto",
                         option="device")
    if device not in ("cpu", "cuda"):
        raise LgsegError(f"unknown device '{device}'; choose auto, cpu or cuda", option="device")
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
        raise LgsegError(f"the slicing axis must be 0, 1 or 2 (IJK order), not {axis}", option="axis")
    return np.moveaxis(array, 2 - axis, 0)


class Segmenter:
    """A built network and its model's config, ready to segment images: load once (:meth:`load`), call many times.

    ``Segmenter(network, config, device)`` uses the network on ``device`` as it is (e.g. one being trained: not
    folded or compiled, its weights shared), so that validation during training runs the same code as
    ``lgseg evaluate``. ``fuse_after`` is the number of slices to segment before the convolutions are compiled for
    the CPU (None: never). ``domain``: the model's domain description (None: applicability unknown).
    """

    def __init__(self, network: LanguageGuidedSegNet, config: ModelConfig, device: torch.device,
                 *, text_encoder: Optional[TextEncoder] = None, batch_size: Optional[int] = None,
                 fuse_after: Optional[int] = None, domain: Optional[Domain] = None):
        # The process's torch thread count is used as it is: a library does not change process-wide settings
        # (inside 3D Slicer they belong to every extension); a program sets it with OMP_NUM_THREADS or
        # torch.set_num_threads.
        self.network = network
        self.config = config
        self.device = device
        self.preprocess = config.preprocessing
        self.batch_size = batch_size or (16 if self.device.type == "cuda" else 4)
        self.fuse_after = fuse_after
        self._text_encoder = text_encoder
        self.domain = None if domain is None else domain.to(device)

    @classmethod
    def load(cls, model: Union[PathLike, ModelPackage, None] = None, device: str = "auto",
             batch_size: Optional[int] = None) -> Segmenter:
        """Load and verify a model package (a name, a folder or a loaded package; None: the default model) and build
        its network on ``device`` for inference: batch norm folded, channels-last, and on the CPU the convolutions
        compiled once ``FUSE_AFTER_SLICES`` slices have been segmented."""
        package = model if isinstance(model, ModelPackage) else load_package(model)
        resolved = resolve_device(device)
        domain = package.domain()
        network = fold_batchnorm(package.build_network(resolved))
        network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch's stub
        return cls(network, package.config, resolved, batch_size=batch_size, domain=domain,
                   fuse_after=FUSE_AFTER_SLICES if resolved.type == "cpu" else None)  # oneDNN: the CPU only

    @functools.cached_property
    def _prototype_sides(self) -> Optional[list[Optional[str]]]:
        """Laterality of each prototype's report where the model's reports name sides (QaTa scheme): the
        approximated report is then the most similar prototype that agrees with the mask it produced."""
        config = self.config
        if config.report_parser != "qata" or len(config.prototype_reports) != self.network.bank.size:
            return None
        return [report_laterality(report) for report in config.prototype_reports]

    @functools.cached_property
    def report_check(self) -> Optional[ReportCheck]:
        """The check of a given report against the slice segmented without it (:mod:`consistency`), where the
        model's reports name sides (QaTa scheme); None otherwise."""
        if self.config.report_parser != "qata" or self.config.report_sides in (None, "none"):
            return None
        return ReportCheck(self.config.card, lambda slices: self.predict_slices(slices).probabilities)

    @property
    def text_encoder(self) -> TextEncoder:
        """The package's text encoder, loaded on first use (a run without a report never loads it)."""
        if self._text_encoder is None:
            config = self.config
            installed = encoder_version(config.text_encoder)
            # Packages saved before the version was recorded have none: not checked.
            if config.text_encoder_version and installed != config.text_encoder_version:
                raise LgsegError(f"model '{config.name}' was trained with version {config.text_encoder_version} of "
                                 f"text encoder '{config.text_encoder}' but version {installed} is installed (it comes "
                                 "with languageguidedseg); use the languageguidedseg release that bundles version "
                                 f"{config.text_encoder_version}, or retrain the model with Training/train.py")
            encoder = TextEncoder(config.text_encoder, max_tokens=config.max_tokens)
            if encoder.dim != config.network.text_dim:
                raise LgsegError(f"text encoder '{config.text_encoder}' gives {encoder.dim}-d tokens but model "
                                 f"'{config.name}' expects {config.network.text_dim}; "
                                 "use the model's own encoder")
            self._text_encoder = encoder
        return self._text_encoder

    def _compile_when_worth_it(self, slices: int) -> None:
        """Fuse the convolutions once this Segmenter has been given ``fuse_after`` slices in all."""
        if self.fuse_after is None:
            return
        self.fuse_after -= slices
        if self.fuse_after <= 0:
            with torch.inference_mode(False):  # tracing records ordinary tensors
                self.network = fuse_convolutions(self.network, self.preprocess.size)
            self.fuse_after = None

    def _guidance(self, report: Optional[str]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        text = normalize_report(report)
        if text is None:
            return None
        encoding = self.text_encoder.encode([text]).to(self.device)
        return encoding.tokens, encoding.mask

    def _domain_scores(self, pooled: torch.Tensor) -> np.ndarray:
        """Domain scores of a batch's pooled features; NaN where the model has no domain description."""
        if self.domain is None:
            return np.full(len(pooled), np.nan)
        return self.domain.scores(pooled).cpu().numpy().astype(np.float64)

    @torch.inference_mode()
    def domain_scores(self, slices: np.ndarray) -> np.ndarray:
        """The domain score of each slice of a stack ``[N, H, W(, 3)]``, from the encoder alone (no decoder): what
        :func:`choose_model` compares. NaN where the model has no domain description."""
        scores = [self._domain_scores(self.pooled_features(slices[start:start + self.batch_size]))
                  for start in range(0, slices.shape[0], self.batch_size)]
        return np.concatenate(scores) if scores else np.empty(0)

    @torch.inference_mode()
    def pooled_features(self, slices: np.ndarray) -> torch.Tensor:
        """The encoder's pooled features ``[N, C]`` of a batch of slices, as the network's forward pools them (what
        a domain description models; ``Training/`` describes a model's images with this)."""
        images = prepare_slices(slices, self.preprocess).to(self.device, memory_format=torch.channels_last)
        return self.network.pooled_features(self.network.encoder(images))

    @torch.inference_mode()
    def predict_slices(self, slices: np.ndarray, report: Union[str, None, Sequence[Optional[str]]] = None,
                       progress: Optional[ProgressCallback] = None,
                       cancel: Optional[CancelCallback] = None) -> SlicePredictions:
        """Foreground probabilities ``[N, H, W]`` for a stack of slices ``[N, H, W(, 3)]``, and each slice's
        domain score (from the features that the forward computes anyway).

        ``report`` is one report for every slice, or a sequence of one report per slice (e.g. a batch of different
        images); None or an empty report means the prototype bank guides that slice, averaged over the model's
        zoomed and mirrored views and kept to a side that its approximated report names alone (see
        :class:`Approximation`). Returns the probabilities and, in prototype mode (``report`` None or empty), each
        slice's approximated report as a prototype index and its similarity; with a sequence of reports, slices that
        had a report get -1 and NaN (:class:`SlicePredictions`).
        """
        total = slices.shape[0]
        self._compile_when_worth_it(total)
        texts: list[Optional[str]] = []
        guidance = None
        per_slice = report is not None and not isinstance(report, str)
        if report is None or isinstance(report, str):
            guidance = self._guidance(report)
        else:
            texts = [normalize_report(r) for r in report]
            if len(texts) != total:
                raise ValueError(f"got {len(texts)} reports for {total} slices; give one report per slice")
        probabilities = np.empty(slices.shape[:3], dtype=np.float32)
        nearest: list[int] = []
        similarity: list[float] = []
        domain_scores = np.empty(total, dtype=np.float64)
        for start in range(0, total, self.batch_size):
            if cancel is not None and cancel():
                raise SegmentationCancelled()
            batch = slices[start:start + self.batch_size]
            images = prepare_slices(batch, self.preprocess).to(self.device, memory_format=torch.channels_last)
            bank_rows: list[int] = []
            if per_slice:
                out = self._mixed_forward(images, texts[start:start + len(batch)])
                logits = out["logits"]
                bank_rows = [i for i in range(len(batch)) if texts[start + i] is None]
            elif guidance is None:
                out = self.network(images, return_features=True)
                logits = out["logits"]
                bank_rows = list(range(len(batch)))
            else:
                tokens, mask = guidance
                out = self.network(images, tokens.expand(len(batch), -1, -1), mask.expand(len(batch), -1),
                                   return_features=True)
                logits = out["logits"]
            domain_scores[start:start + len(batch)] = self._domain_scores(out["pooled_features"])
            maps = torch.sigmoid(logits.float())
            if bank_rows:
                maps[bank_rows] = self._average_views(images[bank_rows], maps[bank_rows])
            probs = restore_size(maps, batch.shape[1:3]).cpu().numpy()
            if per_slice or guidance is None:
                ranked = self._rank_prototypes(out["image_features"][bank_rows], probs[bank_rows])
                best = dict(zip(bank_rows, (pairs[0] for pairs in ranked)))
                if self._prototype_sides:
                    for row, (index, _) in best.items():  # the mask agrees with the report it comes with
                        keep_to_side(probs[row], self._prototype_sides[index], self.config.card.threshold)
                nearest += [best[i][0] if i in best else -1 for i in range(len(batch))]
                similarity += [best[i][1] if i in best else float("nan") for i in range(len(batch))]
            probabilities[start:start + len(batch)] = probs
            if progress is not None:
                progress(min(start + len(batch), total), total)
        return SlicePredictions(probabilities, nearest, similarity, domain_scores)

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

    def _average_views(self, images: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        """Bank-guided probabilities ``[N, 1, s, s]`` of ``images`` averaged with those of the model's zoomed and
        mirrored views (``no_report_scales``, ``no_report_flips``), each mapped back: test-time augmentation."""
        config = self.config
        views: list[tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = [
            (functools.partial(zoom, scale=scale), functools.partial(zoom, scale=1.0 / scale))
            for scale in config.card.no_report_scales if scale != 1.0]
        for flip in config.card.no_report_flips:
            mirror = functools.partial(torch.flip, dims=(FLIP_AXES[flip],))
            views.append((mirror, mirror))
        total = probabilities.clone()
        for forward, back in views:
            total += back(torch.sigmoid(self.network(forward(images)).float()))
        return total / (1 + len(views))

    def _rank_prototypes(self, image_features: torch.Tensor,
                         probabilities: np.ndarray) -> list[list[tuple[int, float]]]:
        """Every prototype per slice as (index, similarity), most similar first; where the model's reports name
        sides, the prototypes whose report names the sides where the slice's probabilities say foreground lies
        (:func:`~languageguidedseg.laterality.probability_laterality`) come first (similarity order within)."""
        if not len(probabilities):
            return []
        bank = self.network.bank
        similarities, indices = bank.rank(self.network.image_embedding(image_features), top_k=bank.size)
        sides = self._prototype_sides
        ranked = []
        for row, sims, slice_probabilities in zip(indices.tolist(), similarities.tolist(), probabilities):
            pairs = list(zip(row, sims))
            side = probability_laterality(slice_probabilities, self.config.card.side_presence) if sides else None
            if sides and side is not None:
                pairs.sort(key=lambda pair: sides[pair[0]] != side)  # a stable sort: similarity order within
            ranked.append(pairs)
        return ranked

    @property
    def report_sides(self) -> str:
        """What left and right mean in this model's reports: "image", "patient" or "none"."""
        sides = self.config.report_sides
        if sides is None:  # load_package refuses such a package; a network in training has its data set's
            raise LgsegError(f"model '{self.config.name}' does not declare report_sides; re-save it with it set")
        return sides

    def orientation(self, array: np.ndarray, rgb: bool, axis: int, geometry: Optional[Geometry]) -> Orientation:
        """Which side of the slices along ``axis`` is the patient's left; without geometry, radiological display."""
        return orientation_of(geometry, axis if array.ndim - (1 if rgb else 0) == 3 else 2)

    def _sides(self, sides: str, orientation: Orientation) -> SidesFields:
        shown = result_sides(sides, self.report_sides)
        return SidesFields(sides=shown, orientation=orientation.text, sides_label=sides_label(shown, orientation))

    def segment_array(self, array: np.ndarray, *, rgb: bool = False, report: Optional[str] = None, axis: int = 2,
                      slice_index: Optional[int] = None, threshold: Optional[float] = None,
                      progress: Optional[ProgressCallback] = None,
                      cancel: Optional[CancelCallback] = None, sides: str = "patient",
                      geometry: Optional[Geometry] = None) -> SegmentationResult:
        """Segment a numpy image in SimpleITK order: ``(y, x)`` or ``(z, y, x)``, plus a channel axis if ``rgb``.

        With ``slice_index`` only that slice along ``axis`` (IJK order) is segmented; the rest of the mask is 0.
        An empty report means no report: the prototype bank supplies the guidance and the approximated report.
        ``sides`` is the convention of the report given and returned ("patient": the patient's left and right;
        "image": the sides of the image as displayed); the report is translated into the model's own convention with
        the slices' orientation from ``geometry`` (None: a frontal radiograph in radiological display is assumed).
        """
        started = time.perf_counter()
        check_sides(sides)
        threshold = self.config.card.threshold if threshold is None else threshold
        if not 0.0 < threshold < 1.0:
            raise LgsegError(f"threshold must lie between 0 and 1, not {threshold}", option="threshold")
        if array.size == 0:
            raise LgsegError("the image is empty (a dimension of size 0); give a non-empty image")
        stack = slices_of(array, rgb, axis)
        orientation = self.orientation(array, rgb, axis, geometry)
        text = normalize_report(report)
        model_text = None if text is None else translate_report(text, sides, self.report_sides, orientation)
        spatial_shape = array.shape[:-1] if rgb else array.shape
        mask = np.zeros(spatial_shape, dtype=np.uint8)
        mask_stack = slices_of(mask, False, axis)  # a view: writing into it fills ``mask``
        if slice_index is not None:
            if not 0 <= slice_index < stack.shape[0]:
                raise LgsegError(f"slice {slice_index} is outside the image "
                                 f"(0..{stack.shape[0] - 1} along axis {axis})", option="slice")
            stack, target = stack[slice_index:slice_index + 1], slice(slice_index, slice_index + 1)
        else:
            target = slice(None)
        probabilities, nearest, similarity, scores = self.predict_slices(stack, model_text, progress, cancel)
        mask_stack[target] = probabilities > threshold
        if text is None and self.report_check is not None:  # a report typed next is checked without a second pass
            self.report_check.remember(stack, probabilities)
        labels = self._sides(sides, orientation)
        volume = array.ndim - (1 if rgb else 0) == 3
        applicability = domain_fields(judge(self.domain, scores, self.config.name, volume=volume))
        if text is not None:
            warnings = self._report_warnings(stack, model_text, sides, orientation, applicability["in_domain"])
            return SegmentationResult(mask, text, "given", time.perf_counter() - started, **labels, **applicability,
                                      report_warnings=warnings)
        if applicability["in_domain"] is False:  # the mask, as asked, but no report approximated from it
            return SegmentationResult(mask, "", "prototype", time.perf_counter() - started, **labels,
                                      **applicability)
        # The approximated report shown to the user: the prototype nearest to most slices, in the user's convention.
        index = collections.Counter(nearest).most_common(1)[0][0]
        sims = [s for n, s in zip(nearest, similarity) if n == index]
        approximated = translate_report(self.prototype_report(index), self.report_sides, sides, orientation)
        return SegmentationResult(mask, approximated, "prototype", time.perf_counter() - started,
                                  similarity=float(np.mean(sims)), **labels, **applicability)

    def _report_warnings(self, stack: np.ndarray, model_text: Optional[str], sides: str, orientation: Orientation,
                         in_domain: Optional[bool]) -> list[str]:
        """The report (in the model's convention) checked against the slice, in the words of ``sides``: for one
        slice (a 2D image or ``slice_index``: a volume's every slice would need a second pass), not for an image
        outside the model's domain, nor where the slice has no left-right axis to tell the user's sides by."""
        check = self.report_check
        if check is None or len(stack) != 1 or in_domain is False:
            return []
        if sides != self.report_sides and orientation.patient_left is None:
            return []
        return check.warnings(stack, model_text,
                              lambda side: translate_report(side, self.report_sides, sides, orientation))

    def approximated_reports(self, slices: np.ndarray) -> list[str]:
        """The approximated report of each slice of a stack ``[N, H, W(, 3)]`` (no report given)."""
        predictions = self.predict_slices(slices)
        if self.report_check is not None:  # a check of these slices' reports then needs no second pass
            self.report_check.remember(slices, predictions.probabilities)
        return [self.prototype_report(index) for index in predictions.nearest]

    def prototype_report(self, index: int) -> str:
        reports = self.config.prototype_reports
        return reports[index] if index < len(reports) else f"prototype {index}"

    @torch.inference_mode()
    def approximate(self, array: np.ndarray, *, rgb: bool = False, axis: int = 2,
                    slice_index: Optional[int] = None, top_k: Optional[int] = None, sides: str = "patient",
                    geometry: Optional[Geometry] = None) -> Approximation:
        """The prototype approximation of a 2D image (or one slice; default the middle one) as a report.

        The reports are written in the ``sides`` convention, as in :meth:`segment_array`. The slice is judged for
        applicability; outside the model's domain no report is approximated (see :class:`Approximation`).
        """
        check_sides(sides)
        stack = slices_of(array, rgb, axis)
        orientation = self.orientation(array, rgb, axis, geometry)
        index = stack.shape[0] // 2 if slice_index is None else slice_index
        if not 0 <= index < stack.shape[0]:
            raise LgsegError(f"slice {index} is outside the image (0..{stack.shape[0] - 1} along axis {axis})",
                             option="slice")
        one = stack[index:index + 1]
        images = prepare_slices(one, self.preprocess).to(self.device, memory_format=torch.channels_last)
        out = self.network(images, return_features=True)
        volume = array.ndim - (1 if rgb else 0) == 3
        applicability = domain_fields(judge(self.domain, self._domain_scores(out["pooled_features"]),
                                            self.config.name, volume=volume))
        if applicability["in_domain"] is False:
            return Approximation(report="", similarity=None, **self._sides(sides, orientation), **applicability)
        maps = self._average_views(images, torch.sigmoid(out["logits"].float()))
        probabilities = restore_size(maps, one.shape[1:3]).cpu().numpy()
        ranked = self._rank_prototypes(out["image_features"], probabilities)[0][:top_k or self.network.bank.top_k]
        top = [(translate_report(self.prototype_report(i), self.report_sides, sides, orientation), float(s))
               for i, s in ranked]
        return Approximation(report=top[0][0], similarity=top[0][1], top=top, **self._sides(sides, orientation),
                             **applicability)


CHOICE_SLICES = 9  # a volume's slices, evenly spaced, that choose_model judges (a slice costs one encoder pass)


def choose_model(array: np.ndarray, *, rgb: bool = False, axis: int = 2, slice_index: Optional[int] = None,
                 device: str = "auto", load: Optional[Callable[[str], Segmenter]] = None,
                 models: Optional[Sequence[str]] = None) -> tuple[str, float]:
    """The installed model (``package.list_models``; or ``models``) for which the image is in-domain with the best
    domain score, and that score: ``--model auto``.

    The image (a 2D image, one slice with ``slice_index``, else up to ``CHOICE_SLICES`` evenly spaced slices of a
    volume, their median score) is judged by each model's encoder alone. ``load(name)`` gives a model's Segmenter
    (default ``Segmenter.load(name, device)``); a caching loader (``functools.cache``) keeps the chosen one for the
    segmentation that follows. Where no model's domain fits the image, the error lists what the models are for.
    """
    from .package import list_models, nothing_installed

    names = list(models) if models is not None else [info.name for info in list_models()]
    if not names:
        raise nothing_installed()
    load = load or functools.partial(Segmenter.load, device=device)
    stack = slices_of(array, rgb, axis)
    if slice_index is not None:
        if not 0 <= slice_index < stack.shape[0]:
            raise LgsegError(f"slice {slice_index} is outside the image (0..{stack.shape[0] - 1} along axis {axis})",
                             option="slice")
        stack = stack[slice_index:slice_index + 1]
    elif stack.shape[0] > CHOICE_SLICES:
        stack = stack[np.linspace(0, stack.shape[0] - 1, CHOICE_SLICES).round().astype(int)]
    best: Optional[tuple[str, float]] = None
    purposes = []
    for name in names:
        segmenter = load(name)
        if segmenter.domain is None:
            purposes.append(f"{name} (applicability unknown: no description of its images)")
            continue
        judged = judge(segmenter.domain, segmenter.domain_scores(stack), name)
        purposes.append(f"{name} ({segmenter.domain.config.images}: {segmenter.config.card.task})"
                        if segmenter.config.card.task else f"{name} ({segmenter.domain.config.images})")
        if judged.in_domain and judged.score is not None and (best is None or judged.score > best[1]):
            best = (name, judged.score)
    if best is None:
        raise LgsegError(f"no installed model is made for this image; the models are for: "
                         f"{'; '.join(purposes) or 'none installed'}; choose one explicitly", option="model")
    return best
