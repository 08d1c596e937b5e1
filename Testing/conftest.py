"""Shared fixtures: the data folder beside the checkout and a small model package built by the tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from skip_policy import (  # noqa: F401 - hooks of this conftest: CI fails on a skip that is not allowed
    pytest_collectreport,
    pytest_configure,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the engine must never need the network

try:  # the installed package (CI installs it with pip, so packaging is tested); else the checkout's Logic/
    import languageguidedseg  # noqa: F401
except ImportError:
    _LOGIC = str(Path(__file__).resolve().parents[1] / "Logic")
    sys.path.insert(0, _LOGIC)
    # Subprocesses (lgseg, Training/train.py) find it too.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_LOGIC, os.environ.get("PYTHONPATH")]))
# Training/'s own modules (training.*), for the tests of its parts.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Training"))

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
QATA_REPORT = "bilateral pulmonary infection, two infected areas, lower left lung and middle lower right lung."


def dataset(name: str) -> Path:
    """A dataset folder under ../shared/data, or skip the test with the reason."""
    path = DATA_ROOT / name
    if not (path / "split.json").is_file():
        pytest.skip(f"dataset {name} not found at {path} (the tests read ../shared/data beside the checkout)")
    return path


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread in the test process: the small test models gain nothing from more, and on a busy 2-core
    machine more threads are much slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def own_models_folder(tmp_path, monkeypatch) -> Path:
    """An empty user models folder for the test: the user's own models never leak in."""
    folder = tmp_path / "user-models"
    monkeypatch.setenv("LGSEG_MODELS", str(folder))
    return folder


@pytest.fixture
def no_models_installed(own_models_folder, tmp_path, monkeypatch) -> None:
    """A models search path with nothing on it: an empty user folder, and no models shipped with the package."""
    from languageguidedseg import package

    monkeypatch.setattr(package, "installed_models_folder", lambda: tmp_path / "installed-models")


@pytest.fixture(scope="session")
def qata() -> Path:
    return dataset("qata-cov19")


@pytest.fixture(scope="session")
def kvasir() -> Path:
    return dataset("kvasir-seg")


@pytest.fixture(scope="session")
def distilbert_encoder(tmp_path_factory) -> Path:
    """A small random DistilBERT folder with the default encoder's tokenizer: a text encoder that is not a plain
    BERT, so it loads through transformers."""
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    from languageguidedseg.text import DEFAULT_TEXT_ENCODER, resolve_encoder_path

    folder = tmp_path_factory.mktemp("distilbert")
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=2)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_encoder_path(DEFAULT_TEXT_ENCODER)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A small random-weight model package with a 6-prototype bank (what a real package holds, untrained)."""
    import torch

    from languageguidedseg.config import ModelCard, ModelConfig, NetworkConfig
    from languageguidedseg.network import LanguageGuidedSegNet
    from languageguidedseg.package import save_package

    torch.manual_seed(0)
    # Like the shipped packages: a pooled bank without guided-approximation blocks (their own tests cover those).
    network = LanguageGuidedSegNet(NetworkConfig(bank_size=6, decoder_channels=(64, 48, 32, 24, 16),
                                                 guided_approximation=False))
    network.bank.fill(torch.randn(6, 384), torch.randn(6, 384), torch.arange(6))
    card = ModelCard(task="test model", licence="Apache-2.0", segment_name="Infection", segment_color=(0.9, 0.2, 0.1))
    config = ModelConfig(name="tiny", card=card, prototype_reports=[f"prototype report {i}" for i in range(6)],
                         report_sides="image")  # like qata-cxr: reports name the image's sides
    return save_package(tmp_path_factory.mktemp("models") / "tiny", network, config)


@pytest.fixture(scope="session")
def segmenter(tiny_model):
    """The tiny model, loaded once on the CPU (loading traces the network: seconds)."""
    from languageguidedseg.inference import Segmenter

    return Segmenter.load(tiny_model, "cpu")


@pytest.fixture
def scene():
    """An empty MRML scene of slicer-core, cleared afterwards."""
    slicer = pytest.importorskip("slicer", reason="MRML tests need the slicer-core package")
    scene = slicer.vtkMRMLScene()
    yield scene
    scene.Clear(1)


@pytest.fixture
def hung_worker(tmp_path) -> Path:
    """An executable that the worker runner starts like ``PythonSlicer`` but that never connects and ignores being
    asked to stop (a hung worker): once running it writes its process id to ``<executable>.pid``."""
    path = tmp_path / "hung-worker"
    path.write_text(f"#!{sys.executable}\nimport os, time\nopen(__file__ + '.pid', 'w').write(str(os.getpid()))\n"
                    "time.sleep(120)\n")
    path.chmod(0o755)
    return path
