"""Model packages: a folder with ``model.safetensors`` and ``model.json``, verified by SHA-256 on load.

``model.json`` holds the architecture, text encoder, preprocessing, threshold, segment name and colour, the
prototype reports and what left and right mean in them (``report_sides``), the description of the images the model
was trained on (``domain``; its arrays are in the weights file under ``domain.``), training provenance, metrics and
licence, plus the SHA-256 of the weights. The weights file's metadata holds the SHA-256 of the JSON's content, so a
changed byte in either file is refused. Weights are read with safetensors only: nothing is ever unpickled.

Models are found by name among those installed with the package (``languageguidedseg/models``), in the user's
models folder (``LGSEG_MODELS`` or the platform's user data folder), or by path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from .config import ModelCard, ModelConfig
from .errors import LgsegError
from .fileio import PathLike, atomic_path
from .sides import LEGACY_REPORT_SIDES, REPORT_SIDES

if TYPE_CHECKING:
    import torch

    from .domain import Domain
    from .network import LanguageGuidedSegNet

# The network module (and MONAI, several seconds to import) is imported only when a network is built, and torch and
# safetensors only when weights are read or written, so listing models needs no PyTorch (the Slicer module shows
# the list before PyTorch is installed) and refusing a damaged model stays fast.

# Network settings that packages saved before the setting existed lack, with the design those packages have (their
# JSON is hash-locked, so the value is supplied on load): no guided approximation blocks.
LEGACY_NETWORK = {"guided_approximation": False}

FORMAT = "languageguidedseg-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
DEFAULT_MODEL = "qata-cxr"


@dataclass
class ModelInfo:
    """A model as listed by ``lgseg models`` (read from its JSON, weights not verified)."""

    name: str
    task: str
    licence: str
    version: str
    size_mb: float
    path: Path
    source: str
    threshold: float = ModelCard.threshold
    report_sides: Optional[str] = None  # None: undeclared, the package will be refused on load
    images: str = ""  # the images it was trained on, in words (its domain description); "": not described

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["path"] = str(self.path)
        return values


@dataclass
class ModelPackage:
    """A verified model package: its config, its weights as a state dict (float32) and its domain description's
    arrays (``domain.*`` in the weights file, keys without the prefix; empty in packages saved before it existed)."""

    path: Path
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    weights_sha256: str
    domain_arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    weights_dtype: str = "float16"  # as stored: "float16" or "float32"

    @property
    def name(self) -> str:
        return self.config.name

    def domain(self) -> Optional[Domain]:
        """The domain description (``domain.py``); None where the package has none (applicability unknown)."""
        from .domain import Domain

        if self.config.domain is None:
            return None
        return Domain.from_arrays(self.config.domain, self.domain_arrays)

    def build_network(self, device: Union[str, torch.device] = "cpu") -> LanguageGuidedSegNet:
        """The network with this package's weights, in eval mode on ``device``."""
        from .network import LanguageGuidedSegNet

        network = LanguageGuidedSegNet(self.config.network, pretrained_encoder=False)
        missing, unexpected = network.load_state_dict(self.state_dict, strict=False)
        if missing or unexpected:
            raise LgsegError(f"model '{self.name}' does not match this version of languageguidedseg "
                             f"(missing {missing[:2]}, unexpected {unexpected[:2]}); update the package or the model")
        return network.to(device).eval()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(values: dict[str, Any]) -> bytes:
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _json_file_text(values: dict[str, Any]) -> str:
    """The exact text ``save_package`` writes to ``model.json``; loading compares the file byte by byte with it."""
    return json.dumps(values, indent=2, ensure_ascii=False) + "\n"


def _valid_name(name: object) -> bool:
    """A model name usable as a folder name: no path separators, not hidden, not '.' or '..'."""
    return (isinstance(name, str) and bool(name) and not name.startswith(".") and "/" not in name
            and "\\" not in name and name == name.strip() and name.isprintable())


def installed_models_folder() -> Path:
    """Models shipped inside the installed package."""
    return Path(__file__).resolve().parent / "models"


def user_models_folder() -> Path:
    """The user's models folder: ``LGSEG_MODELS``, else the platform's user data folder."""
    if os.environ.get("LGSEG_MODELS"):
        return Path(os.environ["LGSEG_MODELS"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "languageguidedseg" / "models"


def _candidate_folders() -> list[tuple[str, Path]]:
    return [("user", user_models_folder()), ("installed", installed_models_folder())]


def list_models() -> list[ModelInfo]:
    """All model packages in the user and installed folders (a user model shadows an installed one)."""
    found: dict[str, ModelInfo] = {}
    for source, folder in _candidate_folders():
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            config_path = entry / CONFIG_FILE
            # Hidden folders are import_model's staging folders (or not models at all).
            if entry.name.startswith(".") or entry.name in found or not config_path.is_file():
                continue
            try:
                values = json.loads(config_path.read_text(encoding="utf-8"))
                config = values.get("config", {}) if isinstance(values, dict) else {}
                size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file()) / 2**20
            except (OSError, ValueError, AttributeError):
                continue
            if not isinstance(config, dict):
                continue
            # Models are found by folder name, so that is the name listed (it matches config["name"] for
            # folders written by save_package or import_model).
            found[entry.name] = ModelInfo(name=entry.name, task=str(config.get("task", "")),
                                          licence=str(config.get("licence", "")),
                                          version=str(config.get("version", "")),
                                          size_mb=round(size, 2), path=entry, source=source,
                                          threshold=_threshold(config.get("threshold")),
                                          report_sides=_report_sides(config), images=_images(config))
    return list(found.values())


def _report_sides(config: dict[str, Any]) -> Optional[str]:
    """A listed model's report_sides, as load_package reads it (shipped packages predate the key)."""
    value = config.get("report_sides", LEGACY_REPORT_SIDES.get(str(config.get("name"))))
    return value if value in REPORT_SIDES else None


def _images(config: dict[str, Any]) -> str:
    """A listed model's training images in words, from its domain description ("" without one)."""
    domain = config.get("domain")
    return str(domain.get("images", "")) if isinstance(domain, dict) else ""


def _threshold(value: object) -> float:
    """A listed model's threshold: the number in its config, else the model card's default."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return ModelCard.threshold
    return float(value)


def find_model(model: Optional[PathLike] = None) -> Path:
    """Resolve a model name or folder to its folder; None means the default model."""
    if model is not None and (Path(model).is_dir() or os.sep in str(model) or str(model).startswith(".")):
        path = Path(model)
        if not path.is_dir():
            raise LgsegError(f"model folder '{path}' does not exist; give an installed model's name or a model folder",
                             option="model")
        return path
    name = str(model) if model is not None else DEFAULT_MODEL
    for _, folder in _candidate_folders():
        if (folder / name / CONFIG_FILE).is_file():
            return folder / name
    if model is None:
        raise nothing_installed()
    names = ", ".join(sorted(m.name for m in list_models())) or "none installed"
    raise LgsegError(f"unknown model '{name}' (available: {names}); give a model folder or install the model",
                     option="model")


def nothing_installed() -> LgsegError:
    """The error where a model is needed and none is installed."""
    return LgsegError(f"no model is installed; train one with Training/train.py and copy it to "
                      f"{user_models_folder()}, or give a model folder", option="model")


def load_package(model: Optional[PathLike] = None) -> ModelPackage:
    """Load and verify a model package by name or folder; a changed or missing file is refused."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load as load_safetensors

    path = find_model(model)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise LgsegError(f"model folder '{path}' is missing {required.name}; reinstall or re-export the model")
    try:
        text = config_path.read_bytes().decode("utf-8")
        values = json.loads(text)
    except OSError as exc:
        raise LgsegError(f"cannot read {config_path} ({exc.strerror or exc.__class__.__name__}); check its "
                         "permissions or reinstall the model") from exc
    except ValueError as exc:
        raise LgsegError(f"{config_path} is not valid JSON (the file was changed or damaged); reinstall the model") \
            from exc
    if not isinstance(values, dict) or values.get("format") != FORMAT:
        raise LgsegError(f"{config_path} is not a LanguageGuidedSeg model description; reinstall the model")
    if not isinstance(values.get("format_version"), int) or values["format_version"] > FORMAT_VERSION:
        raise LgsegError(f"model '{path.name}' needs a newer languageguidedseg; upgrade with 'pip install -U .'")
    weights = values.get("weights")
    if not isinstance(weights, dict) or not isinstance(values.get("config"), dict) or text != _json_file_text(values):
        # Any changed byte is refused, including changes that keep the JSON valid (spacing, key order).
        raise LgsegError(f"{config_path} was changed after the model was saved; reinstall the model")
    try:
        data = weights_path.read_bytes()
    except OSError as exc:
        raise LgsegError(f"cannot read {weights_path} ({exc.strerror or exc.__class__.__name__}); check its "
                         "permissions or reinstall the model") from exc
    expected = weights.get("sha256")
    if _sha256(data) != expected:
        raise LgsegError(f"{weights_path} does not match the SHA-256 in {CONFIG_FILE}: the file was changed or "
                         "damaged; reinstall the model")
    try:
        state = load_safetensors(data)  # the bytes whose hash was checked
        with safe_open(str(weights_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, ValueError, OSError) as exc:
        raise LgsegError(f"{weights_path} is not a valid safetensors file; reinstall the model") from exc
    content = {k: v for k, v in values.items() if k != "weights"}
    if metadata.get("config_sha256") != _sha256(_canonical(content)):
        raise LgsegError(f"{config_path} was changed after the model was saved; reinstall the model")
    from .domain import DOMAIN_PREFIX

    # The domain description's arrays are stored in float32 whatever the weights' precision (domain.py).
    domain_arrays = {k[len(DOMAIN_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(DOMAIN_PREFIX)}
    dtypes = {str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()}
    if weights.get("file") != WEIGHTS_FILE or dtypes - {weights.get("dtype")}:
        raise LgsegError(f"{config_path} was changed after the model was saved; reinstall the model")
    stored = content["config"]
    network = stored.get("network")
    if isinstance(network, dict) and any(key not in network for key in LEGACY_NETWORK):
        stored = dict(stored, network={**LEGACY_NETWORK, **network})
    try:
        config = ModelConfig.from_dict(stored, "config")
    except LgsegError as exc:
        raise LgsegError(f"{config_path}: {exc}; the model was written by another version of languageguidedseg, "
                         "install a matching version") from exc
    if not _valid_name(config.name):
        raise LgsegError(f"model '{path.name}' has an invalid name {config.name!r}; re-export it with a plain name")
    if "report_sides" not in content["config"] and config.name in LEGACY_REPORT_SIDES:
        config.report_sides = LEGACY_REPORT_SIDES[config.name]  # shipped before the key existed; hash-locked
    _check_report_sides(config, f"model '{config.name}'", "re-save it with report_sides set (Training/train.py "
                        "takes it from the data set's dataset.json)")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return ModelPackage(path=path, config=config, state_dict=state, weights_sha256=expected,
                        domain_arrays={k: v.float() for k, v in domain_arrays.items()},
                        weights_dtype=str(weights.get("dtype")))


def _check_report_sides(config: ModelConfig, what: str, fix: str) -> None:
    if config.report_sides not in REPORT_SIDES:
        found = "does not declare" if config.report_sides is None else f"has an unknown {config.report_sides!r} for"
        raise LgsegError(f"{what} {found} report_sides (what left and right mean in its reports: "
                         f"{', '.join(REPORT_SIDES)}); {fix}")


def save_package(folder: PathLike, network: LanguageGuidedSegNet, config: ModelConfig,
                 half: bool = True, domain: Optional[Domain] = None) -> Path:
    """Write a model package; both files are written atomically, the JSON last.

    ``half`` stores floating-point weights in float16 (halves the size; the network computes in float32).
    ``domain``: the description of the images the model was trained on (``config.domain`` becomes its config; its
    arrays are stored in float32 under ``domain.`` in the weights file, covered by the same hashes); None: none.
    """
    from safetensors.torch import save as save_safetensors

    from .domain import DOMAIN_PREFIX

    if not _valid_name(config.name):
        raise LgsegError(f"invalid model name {config.name!r}; use a plain folder name (no '/', '\\' or leading '.')")
    _check_report_sides(config, f"model config '{config.name}'", "set report_sides in the ModelConfig")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.network = network.config
    config.network.bank_size = network.bank.size
    config.network.bank_tokens = network.bank.tokens
    config.domain = None if domain is None else domain.config
    content = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict()}
    state = {}
    for key, value in network.state_dict().items():
        value = value.detach().cpu()
        if half and value.is_floating_point():
            value = value.half()
        state[key] = value.contiguous()
    for key, value in (domain.arrays() if domain is not None else {}).items():
        state[DOMAIN_PREFIX + key] = value.detach().cpu().float().contiguous()
    data = save_safetensors(state, metadata={"config_sha256": _sha256(_canonical(content)), "format": FORMAT})
    values = dict(content, weights={"file": WEIGHTS_FILE, "sha256": _sha256(data),
                                    "dtype": "float16" if half else "float32"})
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        tmp.write_bytes(data)
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_bytes(_json_file_text(values).encode("utf-8"))  # bytes: no newline translation on Windows
    return folder


def import_model(folder: PathLike) -> ModelInfo:
    """Verify a model folder and copy it into the user's models folder (replacing one of the same name)."""
    package = load_package(Path(folder))
    target_root = user_models_folder()
    target_root.mkdir(parents=True, exist_ok=True)
    target = target_root / package.name
    staging = Path(tempfile.mkdtemp(prefix=f".{package.name}.", dir=target_root))
    try:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(package.path / name, staging / name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return next(m for m in list_models() if m.path == target)
