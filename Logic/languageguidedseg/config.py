"""Configuration dataclasses read from plain dictionaries (``model.json``, YAML), strictly.

Every configuration dataclass of the engine and of ``Training/`` derives from :class:`Config`, so there is one
``from_dict``: an unknown key is an error that names the key and the known ones, a value of the wrong type is an
error that names its key, nested sections become their own dataclasses and lists become tuples where a field is a
tuple. ``to_dict`` is the way back (JSON-ready: tuples as lists).

The engine's own configurations live here too (the network's architecture, the preprocessing, the model card and the
whole model description of ``model.json``), so that reading a model package's description imports no PyTorch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar, Union

from .errors import LgsegError
from .text import DEFAULT_TEXT_ENCODER, MAX_TOKENS

C = TypeVar("C", bound="Config")
T = TypeVar("T")
_UNIONS = (Union, getattr(types, "UnionType", Union))  # ``X | None`` is a types.UnionType from Python 3.10

# Field metadata of a nested config whose keys are written among those of the enclosing section rather than as a
# section of their own (ModelConfig.card: model.json's keys predate the card).
INLINE = {"inline": True}


class Config:
    """Mixin for configuration dataclasses: strict :meth:`from_dict` and JSON-ready :meth:`to_dict`."""

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any], where: str = "") -> C:
        """Build from a mapping; ``where`` names the section in error messages (e.g. ``"network"``)."""
        return from_dict(cls, values, where)

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary of builtin types: nested configs as dictionaries, tuples as lists."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # Config is mixed into dataclasses only
            value = _plain(getattr(self, f.name))
            if f.metadata.get("inline"):
                values.update(value)
            else:
                values[f.name] = value
        return values


def from_dict(cls: type[T], values: Mapping[str, Any], where: str = "") -> T:
    """The dataclass ``cls`` from ``values``; unknown keys, missing required keys and wrong types are errors."""
    section = where or cls.__name__
    if not isinstance(values, Mapping):
        raise LgsegError(f"{section} must be a mapping of keys to values, not {type(values).__name__}")
    kinds = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    inline = {f.name: _keys(kinds[f.name]) for f in fields if f.metadata.get("inline")}
    known = [key for f in fields for key in inline.get(f.name, [f.name])]
    unknown = [key for key in values if key not in known]
    if unknown:
        raise LgsegError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)} in "
                         f"{section}; known keys: {', '.join(known)}")
    required = [f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values and name not in inline]
    if missing:
        raise LgsegError(f"{section} needs the key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    kwargs = {}
    for f in fields:
        if f.name in inline:
            kwargs[f.name] = from_dict(kinds[f.name], {k: values[k] for k in inline[f.name] if k in values}, where)
        elif f.name in values:
            kwargs[f.name] = _convert(values[f.name], kinds[f.name], f"{where}.{f.name}" if where else f.name)
    return cls(**kwargs)


def _keys(cls: type) -> list[str]:
    """The keys of a section of type ``cls``, those of its inline fields included."""
    kinds = typing.get_type_hints(cls)
    return [key for f in dataclasses.fields(cls) if f.init
            for key in (_keys(kinds[f.name]) if f.metadata.get("inline") else [f.name])]


def _convert(value: Any, kind: Any, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in _UNIONS:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _convert(value, options[0], key) if len(options) == 1 else value
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        return from_dict(kind, value if value is not None else {}, key)
    if origin is tuple or kind is tuple:
        if not isinstance(value, (list, tuple)):
            raise LgsegError(f"{key} must be a list, not {value!r}")
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise LgsegError(f"{key} needs {len(args)} values, got {len(value)}")
        kinds = args if args and args[-1] is not Ellipsis else [args[0] if args else Any] * len(value)
        return tuple(_convert(v, k, f"{key}[{i}]") for i, (v, k) in enumerate(zip(value, kinds)))
    if origin is list or kind is list:
        if not isinstance(value, (list, tuple)):
            raise LgsegError(f"{key} must be a list, not {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or kind is dict:
        if not isinstance(value, Mapping):
            raise LgsegError(f"{key} must be a mapping, not {value!r}")
        return dict(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LgsegError(f"{key} must be a number, not {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LgsegError(f"{key} must be a whole number, not {value!r}")
        return value
    if kind in (str, bool) and not isinstance(value, kind):
        raise LgsegError(f"{key} must be {'text' if kind is str else 'true or false'}, not {value!r}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass
class NetworkConfig(Config):
    """Architecture of the network (``network.py``); stored in every model package."""

    encoder: str = "efficientnet-lite0"
    text_dim: int = 384
    # Decoder widths from the deepest level up, one per encoder level used (strides 32, 16, 8, 4 here); the first
    # ``attention_stages`` levels carry attention. Stopping at stride 4 halves the decoder's convolution work.
    decoder_channels: tuple[int, ...] = (96, 64, 48, 32)
    attention_stages: int = 3
    heads: int = 4
    contrast_dim: int = 128
    bank_size: int = 0
    bank_top_k: int = 3
    # Text tokens per prototype, set when the bank is built: 0 = one pooled vector per prototype (the first
    # shipped models), else the members' token features averaged position by position (ProLearn).
    bank_tokens: int = 0
    # ProLearn's guided approximation before each attention stage, for bank guidance only. Packages saved before
    # this key existed have none (package.py).
    guided_approximation: bool = True
    prototype_momentum: float = 0.99


@dataclass
class PreprocessConfig(Config):
    """How slices become network input (``preprocess.py``): output size, intensity window percentiles, colour
    normalisation."""

    size: int = 224
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        self.mean = tuple(float(value) for value in self.mean)  # type: ignore[assignment]  # length checked below
        self.std = tuple(float(value) for value in self.std)  # type: ignore[assignment]
        if int(self.size) != self.size or self.size < 1:
            raise LgsegError(f"preprocessing size must be a positive integer, got {self.size!r}; fix the configuration")
        self.size = int(self.size)
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise LgsegError(
                f"preprocessing percentiles must satisfy 0 <= lower < upper <= 100, got {self.lower_percentile} and "
                f"{self.upper_percentile}; fix the configuration"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0.0:
            raise LgsegError("preprocessing mean and std need 3 values each, std > 0; fix the configuration")


FLIP_AXES = {"horizontal": -1, "vertical": -2}  # no_report_flips: the image axis each mirrors


@dataclass
class ModelCard(Config):
    """What a model says about itself to its users: task, description and licence, the segment it writes, and the
    settings chosen on the validation split (``Training/``'s ``package:`` section)."""

    task: str = ""
    description: str = ""
    licence: str = ""
    segment_name: str = "Segment"
    segment_color: tuple[float, float, float] = (1.0, 0.0, 0.0)
    threshold: float = 0.5
    # Without a report the image is also segmented zoomed about its centre by each of no_report_scales and mirrored
    # along each of no_report_flips ("horizontal", "vertical"), and the probabilities mapped back and averaged (the
    # defaults: one pass); side_presence decides the sides that the approximated report names (laterality.py).
    # Chosen on the validation split (Training/README.md).
    no_report_scales: tuple[float, ...] = (1.0,)
    no_report_flips: tuple[str, ...] = ()
    side_presence: float = 0.5
    # Where reports name sides, a report naming one side only is checked against the image segmented without it
    # (consistency.py): warned about where the other half's presence reaches report_check_shown and exceeds the named
    # half's by report_check_margin in log-odds. The defaults were chosen for qata-cxr on QaTa val
    # (Training/README.md); its shipped package predates the keys.
    report_check_shown: float = 0.5
    report_check_margin: float = 0.5

    def __post_init__(self) -> None:
        if not all(scale > 0 for scale in self.no_report_scales):
            raise LgsegError(f"no_report_scales must be positive, not {list(self.no_report_scales)}")
        unknown = [flip for flip in self.no_report_flips if flip not in FLIP_AXES]
        if unknown:
            raise LgsegError(f"unknown no_report_flips {unknown}; use {', '.join(FLIP_AXES)}")


@dataclass
class DomainConfig(Config):
    """What images a model was trained on and how an image is judged to be one of them (``domain.py``).

    Written by ``Training/`` with the description's arrays (``domain.*`` in the weights file): the distance of an
    image's pooled encoder features from the training images' becomes ``domain_score = 2 ** (-distance / scale)``.
    """

    images: str  # the training images in words, with an article: "a frontal chest X-ray"
    method: str  # how the distance is measured: "mahalanobis" over the principal components kept (domain.py)
    components: int  # principal components kept
    shrinkage: float  # share of the mean variance added to each component's variance
    scale: float  # the training images' median distance: their median score is 0.5
    threshold: float  # the score below which an image is out of domain (calibrated on the val split)
    train_images: int = 0
    val_images: int = 0
    val_in_domain_rate: float = 0.0  # the share of the val split at or above the threshold

    def __post_init__(self) -> None:
        if self.method != "mahalanobis":
            raise LgsegError(f"unknown domain method {self.method!r}; this version knows mahalanobis")
        if self.components < 1 or self.scale <= 0.0 or not 0.0 < self.threshold < 1.0 or self.shrinkage < 0.0:
            raise LgsegError("domain needs components >= 1, scale > 0, shrinkage >= 0 and a threshold between 0 "
                             "and 1; re-describe the model with Training/train.py --describe-domain")


@dataclass
class ModelConfig(Config):
    """Everything about a model except its weights; written to ``model.json`` (the card's keys among the others)."""

    name: str
    network: NetworkConfig = field(default_factory=NetworkConfig)
    version: str = "0.1.0"
    card: ModelCard = field(default_factory=ModelCard, metadata=INLINE)
    text_encoder: str = DEFAULT_TEXT_ENCODER
    text_encoder_version: str = ""  # the installed text encoder's, when the model was trained (text.encoder_version)
    max_tokens: int = MAX_TOKENS
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    prototype_reports: list[str] = field(default_factory=list)
    # What "left" and "right" mean in the model's reports: "image", "patient" or "none" (see sides.py).
    # No default: save_package refuses a package that does not say.
    report_sides: Optional[str] = None
    report_parser: Optional[str] = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # The images the model was trained on, for the applicability check; None in packages saved before it existed
    # (their applicability is unknown).
    domain: Optional[DomainConfig] = None
