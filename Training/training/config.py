"""A training run's configuration: a tree of typed dataclasses read strictly from YAML.

Every default of a run lives here, in ``losses:`` (``training.losses.LossWeights``), or in the engine's own
configuration (``network:`` is the engine's ``NetworkConfig``, ``preprocessing:`` its ``PreprocessConfig``,
``package:`` its ``ModelCard``). An unknown key anywhere is an error that names the key and the known ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from languageguidedseg.config import Config, ModelCard, NetworkConfig, PreprocessConfig
from languageguidedseg.data import dataset_report_sides
from languageguidedseg.errors import LgsegError
from languageguidedseg.text import DEFAULT_TEXT_ENCODER

from .losses import LossWeights

REPO_ROOT = Path(__file__).resolve().parents[2]


def repository_path(path: str) -> Path:
    """A folder named in a config (``data.path``, ``init_from``, ``teachers``); a relative one is relative to the
    repository root."""
    folder = Path(path).expanduser()
    return folder if folder.is_absolute() else REPO_ROOT / folder


@dataclass
class PackageConfig(ModelCard):
    """What the model package says about itself: the engine's model card, plus the training data's citation (kept
    with the package's training provenance)."""

    data_citation: str = ""
    # The training images in words, with an article ("a frontal chest X-ray"): the package's domain description
    # names them in the warning for an image that does not look like them (training/domain.py).
    domain_images: str = ""

    def card(self) -> ModelCard:
        """The model card alone, as the package's ``ModelConfig`` holds it."""
        return ModelCard(**{f.name: getattr(self, f.name) for f in fields(ModelCard)})


@dataclass
class DataConfig(Config):
    """Which images train and validate, and how they are fed."""

    path: str  # a dataset folder; a relative path is relative to the repository root
    train_split: str = "train"
    val_split: str = "val"
    text_ratio: float = 1.0  # share of training reports kept (ProLearn's limited-text protocol)
    report_parser: Optional[str] = None  # pseudo-labels for the bank: qata, kvasir or none
    limit: Optional[int] = None  # a seeded subset of N training images (and of at most N validation images)
    val_limit: Optional[int] = None
    # Share of the training samples that have report edits (training.edits: one side of a bilateral QaTa
    # case, one polyp of a Kvasir case) which train, each epoch, on one of them instead of their own report and mask.
    report_edits: float = 0.0
    # DataLoader worker processes that augment the next batches; 0 = in the training process; none = 4 per GPU, and
    # on a CPU 1 where a process has two cores or more (see Runtime.loader_workers). Results do not depend on it.
    workers: Optional[int] = None

    def root(self) -> Path:
        return repository_path(self.path).resolve()

    def report_sides(self) -> str:
        """What left and right mean in the data set's reports (its ``dataset.json``); the model declares the same."""
        sides = dataset_report_sides(self.root())
        if sides is None:
            raise LgsegError(f"'{self.root()}' has no dataset.json declaring report_sides; add one, e.g. "
                             '{"report_sides": "image"} when "left" in its reports is the image\'s left')
        return sides


@dataclass
class OptimisationConfig(Config):
    """Epochs, batches, AdamW with linear warm-up then cosine decay, and the report dropout."""

    epochs: int = 10
    batch_size: int = 16  # images per step and process
    lr: float = 6e-4  # decoder, heads and bank
    encoder_lr: float = 3e-4  # ImageNet-initialised encoder
    weight_decay: float = 0.01
    warmup_steps: int = 200
    gradient_clip: float = 1.0
    freeze_encoder_blocks: int = 3  # the encoder's early blocks keep their ImageNet weights
    report_dropout: float = 0.3  # share of reports dropped at random so one model serves both modes

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise LgsegError(f"optimisation: epochs and batch_size must be 1 or more, not {self.epochs} and "
                             f"{self.batch_size}")
        if not 0.0 <= self.report_dropout <= 1.0:
            raise LgsegError(f"optimisation report_dropout must lie in [0, 1], not {self.report_dropout}")


@dataclass
class BankConfig(Config):
    """ProLearn's prototype bank: warm-up epochs, the query's contrastive alignment, then k-means clusters per
    pseudo-label class."""

    warmup_epochs: int = 1  # epochs in which only the samples with reports train, before the bank is built
    # Passes of the query head alone over the encoder's features of the samples with reports (InfoNCE against their
    # reports), right before clustering: aligns the image query with the text at the cost of one forward pass.
    query_epochs: int = 20
    clusters_per_class: int = 16
    tokens: bool = True  # each prototype keeps its members' averaged token features (ProLearn), else one vector

    def __post_init__(self) -> None:
        if self.warmup_epochs < 0 or self.query_epochs < 0 or self.clusters_per_class < 1:
            raise LgsegError("bank: warmup_epochs and query_epochs must be 0 or more, clusters_per_class 1 or more")


@dataclass
class AugmentationConfig(Config):
    """MONAI random affine and intensity changes (never flips, because reports name the patient's sides), and the
    appearance of other cameras and clinics (Training/training/augment.py); every one off by default."""

    rotate_degrees: float = 0.0
    scale: float = 0.0  # relative zoom range, e.g. 0.1 = +-10 %
    translate: float = 0.0  # share of the image size
    intensity: float = 0.0  # relative scale and shift of intensities
    affine_probability: float = 0.7
    intensity_probability: float = 0.5
    # Appearance, drawn on the image in [0, 1] (languageguidedseg.corruptions, the operations of lgseg evaluate
    # --corrupt); each applied with appearance_probability.
    colour_balance: float = 0.0  # each RGB channel times its own 1 +- colour_balance
    hue_degrees: float = 0.0  # hue turned by up to +- hue_degrees
    saturation: float = 0.0  # saturation times 1 +- saturation
    gamma: float = 0.0  # contrast: intensities to the power 1 +- gamma
    blur_sigma: float = 0.0  # Gaussian blur, sigma from 0.25 to blur_sigma pixels of the network's input
    jpeg_quality: int = 0  # JPEG round trip at a quality from jpeg_quality to 95; 0 = off
    # The frame of another video system (lgseg evaluate --corrupt border, resize, overlay, specular, fov).
    border: float = 0.0  # black bars of up to this share of the width left and right, image and mask squeezed
    resolution: float = 0.0  # down-sampled to a factor from 1 - resolution to 1 and back (a coarser camera)
    overlay_lines: int = 0  # up to this many lines of on-screen text
    specular: int = 0  # up to this many added specular highlights
    fov_radius: float = 0.0  # black outside a circle of radius drawn from fov_radius to 1 (of the half-diagonal)
    appearance_probability: float = 0.25

    def __post_init__(self) -> None:
        if not 0 <= self.jpeg_quality <= 95:
            raise LgsegError(f"augmentation jpeg_quality must lie in 1-95 (0 = off), not {self.jpeg_quality}")
        if not (0.0 <= self.border <= 1.0 and 0.0 <= self.resolution < 1.0 and self.overlay_lines >= 0
                and self.specular >= 0 and (self.fov_radius == 0.0 or 0.3 <= self.fov_radius <= 1.0)):
            raise LgsegError("augmentation: border must lie in [0, 1], resolution in [0, 1), overlay_lines and "
                             "specular 0 or more, fov_radius in [0.3, 1] (0 = off)")
        if not 0.0 <= self.appearance_probability <= 1.0:
            raise LgsegError(f"augmentation appearance_probability must lie in [0, 1], not "
                             f"{self.appearance_probability}")

    @property
    def enabled(self) -> bool:
        return any((self.rotate_degrees, self.scale, self.translate, self.intensity))

    @property
    def appearance_enabled(self) -> bool:
        return any((self.colour_balance, self.hue_degrees, self.saturation, self.gamma, self.blur_sigma,
                    self.jpeg_quality, self.border, self.resolution, self.overlay_lines, self.specular,
                    self.fov_radius))


@dataclass
class TrainConfig(Config):
    """A training run; read from YAML, then overridden from the command line."""

    name: str
    data: DataConfig
    package: PackageConfig = field(default_factory=PackageConfig)
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    text_encoder: str = DEFAULT_TEXT_ENCODER
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimisation: OptimisationConfig = field(default_factory=OptimisationConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    losses: LossWeights = field(default_factory=LossWeights)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    init_from: Optional[str] = None  # a model package folder whose weights and prototype bank start the run
    # Distillation: model package folders whose averaged no-report probabilities on the training images are soft
    # targets for the steps that train without a report (training/distill.py; weight losses.distillation).
    teachers: list[str] = field(default_factory=list)
    seed: int = 0
    amp: str = "auto"  # bf16 autocast: auto (on CUDA), bf16, or off
    threads: Optional[int] = None  # CPU threads per process; default: cores / processes

    def __post_init__(self) -> None:
        if self.amp not in ("auto", "bf16", "off"):
            raise LgsegError(f"amp must be auto, bf16 or off, not {self.amp!r}")


# Settings that do not change the result: a resumed run may differ in these.
NOT_SHAPING_RESULTS = ("threads", "data.workers")


def load_config(path: Path, overrides: Optional[dict[str, Any]] = None) -> TrainConfig:
    """The run's configuration from a YAML file, with ``overrides`` (dotted keys, e.g. ``"data.limit"``) applied."""
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise LgsegError(f"cannot read config '{path}' ({exc.__class__.__name__}); give a YAML file") from exc
    if not isinstance(values, dict):
        raise LgsegError(f"config '{path}' must be a mapping of keys to values")
    for dotted, value in (overrides or {}).items():
        *sections, key = dotted.split(".")
        target = values
        for depth, section in enumerate(sections):
            if target.get(section) is None:
                target[section] = {}
            target = target[section]
            if not isinstance(target, dict):
                raise LgsegError(f"config '{path}': {'.'.join(sections[:depth + 1])} must be a mapping of keys to "
                                 f"values (e.g. data: {{path: ...}}), not {target!r}")
        target[key] = value
    try:
        return TrainConfig.from_dict(values)
    except LgsegError as exc:
        raise LgsegError(f"config '{path}': {exc}") from exc


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dictionaries as one level with dotted keys (``{"data": {"limit": 4}}`` -> ``{"data.limit": 4}``)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
