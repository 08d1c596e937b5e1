"""Model packages: a save/load round trip, the hash checks that refuse changed or missing files, finding models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from languageguidedseg.cli import main
from languageguidedseg.config import ModelCard, ModelConfig, NetworkConfig, PreprocessConfig
from languageguidedseg.errors import LgsegError
from languageguidedseg.network import LanguageGuidedSegNet
from languageguidedseg.package import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    find_model,
    import_model,
    list_models,
    load_package,
    save_package,
    user_models_folder,
)

SIZE = 128


pytestmark = pytest.mark.usefixtures("own_models_folder")


def _network(seed: int = 0) -> LanguageGuidedSegNet:
    torch.manual_seed(seed)
    net = LanguageGuidedSegNet(NetworkConfig(bank_size=5, decoder_channels=(64, 48, 32, 24, 16)))
    net.bank.fill(torch.randn(5, 384), torch.randn(5, 384), torch.arange(5))
    for stage in net.guide_stages:  # trained-looking gates, so the visual prototype matters
        torch.nn.init.normal_(stage.prototype_gate.weight, std=0.5)
    net.update_visual_prototype(torch.randn(3, 16))
    return net.eval()


def _config(name: str = "roundtrip") -> ModelConfig:
    card = ModelCard(task="round trip test", licence="Apache-2.0", threshold=0.4, segment_name="Lesion",
                     segment_color=(0.1, 0.8, 0.3))
    return ModelConfig(name=name, card=card, preprocessing=PreprocessConfig(size=SIZE),
                       prototype_reports=[f"report {i}" for i in range(5)], report_sides="patient",
                       metrics={"dice": 0.5})


@torch.inference_mode()
def _outputs(net: LanguageGuidedSegNet) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, SIZE, SIZE, generator=generator)
    tokens = torch.randn(2, 7, 384, generator=generator)
    return net(images, tokens), net(images)  # report guidance, prototype guidance


def _copy(package: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy" / package.name
    shutil.copytree(package, target)
    return target


def _refused(path: Path, match: str) -> str:
    with pytest.raises(LgsegError, match=match) as info:
        load_package(path)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------- round trip


def test_round_trip_float32_is_exact(tmp_path):
    net = _network()
    folder = save_package(tmp_path / "roundtrip", net, _config(), half=False)
    package = load_package(folder)
    loaded = package.build_network()
    for expected, actual in zip(_outputs(net), _outputs(loaded)):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    torch.testing.assert_close(loaded.visual_prototype, net.visual_prototype, atol=0, rtol=0)
    torch.testing.assert_close(loaded.bank.image_keys, net.bank.image_keys, atol=0, rtol=0)


def test_round_trip_float16_storage(tmp_path):
    net = _network()
    folder = save_package(tmp_path / "roundtrip", net, _config())
    package = load_package(folder)
    assert json.loads((folder / CONFIG_FILE).read_text())["weights"]["dtype"] == "float16"
    assert all(v.dtype != torch.float16 for v in package.state_dict.values())  # computed in float32
    loaded = package.build_network()
    # Identical to the original network with its weights rounded to float16 ...
    rounded = _network()
    rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in net.state_dict().items()})
    for expected, actual in zip(_outputs(rounded), _outputs(loaded)):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # ... and close to the original itself.
    for expected, actual in zip(_outputs(net), _outputs(loaded)):
        torch.testing.assert_close(torch.sigmoid(actual), torch.sigmoid(expected), atol=2e-2, rtol=0)


def test_round_trip_keeps_the_description(tmp_path):
    folder = save_package(tmp_path / "roundtrip", _network(), _config())
    config = load_package(folder).config
    expected = _config()
    for key in ("name", "card", "prototype_reports", "report_sides", "preprocessing", "metrics", "text_encoder",
                "max_tokens"):
        assert getattr(config, key) == getattr(expected, key), key
    assert config.card.task == "round trip test" and config.card.segment_color == (0.1, 0.8, 0.3)
    assert config.network.bank_size == 5 and config.network.decoder_channels == (64, 48, 32, 24, 16)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temporary files left


def test_invalid_model_name_refused(tmp_path):
    for name in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(LgsegError, match="name"):
            save_package(tmp_path / "bad", _network(), _config(name))


# ---------------------------------------------------------------- changed and missing files


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_changed_byte_in_weights_refused(tiny_model, tmp_path, where):
    folder = _copy(tiny_model, tmp_path)
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    index = {"start": 10, "middle": len(data) // 2, "end": len(data) - 1}[where]
    data[index] ^= 0x01
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    assert "SHA-256" in _refused(folder, "changed or damaged")


@pytest.mark.parametrize("change", [
    ("\"threshold\": 0.5", "\"threshold\": 0.6"),  # a value
    ("\"Infection\"", "\"Infectiom\""),  # one letter of the segment name
    ("\"float16\"", "\"float32\""),  # the weights description
    ("{\n  \"format\"", "{\n   \"format\""),  # spacing only: still valid JSON with the same content
    ("}\n", "}"),  # the final newline
])
def test_changed_model_json_refused(tiny_model, tmp_path, change):
    folder = _copy(tiny_model, tmp_path)
    text = (folder / CONFIG_FILE).read_text(encoding="utf-8")
    assert text.count(change[0]) >= 1, change[0]
    (folder / CONFIG_FILE).write_text(text.replace(change[0], change[1], 1), encoding="utf-8")
    _refused(folder, "changed")


def test_broken_json_refused(tiny_model, tmp_path):
    folder = _copy(tiny_model, tmp_path)
    (folder / CONFIG_FILE).write_text((folder / CONFIG_FILE).read_text()[:-20])
    _refused(folder, "not valid JSON")


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, CONFIG_FILE])
def test_missing_file_refused(tiny_model, tmp_path, missing):
    folder = _copy(tiny_model, tmp_path)
    (folder / missing).unlink()
    assert missing in _refused(folder, "missing")


def test_missing_model_folder_refused(tmp_path):
    with pytest.raises(LgsegError, match="does not exist"):
        load_package(tmp_path / "nothing")
    with pytest.raises(LgsegError, match="unknown model 'nothing'"):
        load_package("nothing")


# ---------------------------------------------------------------- finding and installing models


def test_models_listed_from_lgseg_models(tiny_model, own_models_folder, capsys):
    shutil.copytree(tiny_model, own_models_folder / "tiny")
    assert user_models_folder() == own_models_folder
    assert main(["models", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    tiny = next(m for m in models if m["name"] == "tiny")
    assert tiny["task"] == "test model" and tiny["licence"] == "Apache-2.0" and tiny["source"] == "user"
    expected_mb = sum(p.stat().st_size for p in tiny_model.iterdir()) / 2**20
    assert tiny["size_mb"] == pytest.approx(expected_mb, abs=0.01)
    assert Path(tiny["path"]) == own_models_folder / "tiny"
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "tiny" in table and "test model" in table and "Apache-2.0" in table and "MB" in table
    # Found by name now, and loadable by name.
    assert find_model("tiny") == own_models_folder / "tiny"
    assert load_package("tiny").name == "tiny"


def test_no_models_listed(no_models_installed, own_models_folder, tmp_path, capsys):
    assert main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    # Says where it looked, so the user knows where to put a model.
    assert listing.startswith("no models installed") and str(own_models_folder) in listing
    assert str(tmp_path / "installed-models") in listing
    with pytest.raises(LgsegError, match="no model is installed"):
        find_model(None)


def test_shipped_models_are_listed_and_load(own_models_folder):
    """The models installed with the package are found by name and pass their own hash checks."""
    shipped = [m for m in list_models() if m.source == "installed"]
    assert {m.name for m in shipped} >= {"qata-cxr", "kvasir-polyp"}
    for info in shipped:
        package = load_package(info.path)
        assert package.name == info.name and package.config.card.threshold == info.threshold


def test_reading_a_models_description_imports_no_torch(tiny_model, own_models_folder):
    """The model list (lgseg models, the Slicer module's list) is shown before PyTorch is installed."""
    import_model(tiny_model)
    code = (
        "import json, sys\n"
        "import languageguidedseg.config, languageguidedseg.package\n"
        "imported = 'torch' in sys.modules\n"
        "from languageguidedseg.cli import main\n"
        "from languageguidedseg.package import list_models\n"
        "names = sorted(m.name for m in list_models())\n"
        "code = main(['models']) + main(['models', '--json'])\n"
        "print(json.dumps([imported, names, code, 'torch' in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported, names, code, torch_loaded = json.loads(result.stdout.splitlines()[-1])
    assert not imported, "importing languageguidedseg.config and .package imported torch"
    assert {"tiny", "qata-cxr", "kvasir-polyp"} <= set(names) and code == 0
    assert not torch_loaded, "listing the models imported torch"


def test_import_model_copies_a_verified_package(tiny_model, own_models_folder):
    info = import_model(tiny_model)
    target = own_models_folder / "tiny"
    assert info.name == "tiny" and info.path == target and info.source == "user"
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (target / name).read_bytes() == (tiny_model / name).read_bytes()
    assert load_package("tiny").weights_sha256 == load_package(tiny_model).weights_sha256
    assert [p.name for p in own_models_folder.iterdir()] == ["tiny"]  # no staging folder left
    import_model(tiny_model)  # importing again replaces the copy
    assert [p.name for p in own_models_folder.iterdir()] == ["tiny"]


def test_import_model_refuses_a_changed_package(tiny_model, own_models_folder, tmp_path):
    folder = _copy(tiny_model, tmp_path)
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0x01
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(LgsegError):
        import_model(folder)
    assert not (own_models_folder / "tiny").exists()


# ---------------------------------------------------------------- what left and right mean in the reports


def _resaved(package: Path, target: Path, change) -> Path:
    """A copy of a package whose ``model.json`` content ``change`` edits in place, with both hashes consistent: a
    package as an earlier version saved it."""
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    from languageguidedseg.package import FORMAT, _canonical, _json_file_text, _sha256

    values = json.loads((package / CONFIG_FILE).read_text())
    change(values["config"])
    content = {k: v for k, v in values.items() if k != "weights"}
    data = save_safetensors(load_safetensors((package / WEIGHTS_FILE).read_bytes()),
                            metadata={"config_sha256": _sha256(_canonical(content)), "format": FORMAT})
    values["weights"]["sha256"] = _sha256(data)
    target.mkdir(parents=True)
    (target / WEIGHTS_FILE).write_bytes(data)
    (target / CONFIG_FILE).write_bytes(_json_file_text(values).encode())
    return target


def _without_report_sides(package: Path, target: Path, name: str) -> Path:
    """A package as saved before ``report_sides`` existed: the key absent."""

    def change(config: dict) -> None:
        del config["report_sides"]
        config["name"] = name

    return _resaved(package, target, change)


def test_packages_declare_report_sides(tiny_model, tmp_path):
    assert json.loads((tiny_model / CONFIG_FILE).read_text())["config"]["report_sides"] == "image"
    assert load_package(tiny_model).config.report_sides == "image"
    for sides in (None, "left"):
        config = _config()
        config.report_sides = sides
        with pytest.raises(LgsegError, match="report_sides") as info:
            save_package(tmp_path / "undeclared", _network(), config)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "undeclared" / CONFIG_FILE).exists()


def test_package_without_report_sides_is_read_as_shipped_or_refused(tiny_model, tmp_path):
    # The shipped packages predate the key (their model.json is hash-locked): read as their training data declares.
    assert load_package("qata-cxr").config.report_sides == "image"
    assert load_package("kvasir-polyp").config.report_sides == "none"
    listed = {m.name: m.report_sides for m in list_models() if m.source == "installed"}
    assert listed["qata-cxr"] == "image" and listed["kvasir-polyp"] == "none"
    legacy = load_package(_without_report_sides(tiny_model, tmp_path / "qata-cxr", "qata-cxr"))
    assert legacy.config.report_sides == "image"
    message = _refused(_without_report_sides(tiny_model, tmp_path / "other", "other"), "report_sides")
    assert "does not declare" in message and "image, patient, none" in message


# ---------------------------------------------------------------- token banks and guided approximation


def _token_bank_network() -> LanguageGuidedSegNet:
    torch.manual_seed(3)
    net = LanguageGuidedSegNet(NetworkConfig(bank_size=5, bank_tokens=4, decoder_channels=(64, 48, 32, 24, 16)))
    mask = torch.tensor([[True] * n + [False] * (4 - n) for n in (1, 2, 3, 4, 4)])
    net.bank.fill(torch.randn(5, 384), torch.randn(5, 4, 384), torch.arange(5), mask)
    return net.eval()


def test_round_trip_token_bank_with_guided_approximation_is_exact(tmp_path):
    net = _token_bank_network()
    assert net.config.guided_approximation and len(net.approximations)
    package = load_package(save_package(tmp_path / "tokens", net, _config(), half=False))
    assert package.config.network.bank_tokens == 4 and package.config.network.guided_approximation
    loaded = package.build_network()
    assert torch.equal(loaded.bank.token_mask, net.bank.token_mask)
    for expected, actual in zip(_outputs(net), _outputs(loaded)):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_package_saved_before_token_banks_loads_as_it_was_saved(tmp_path):
    """A package without ``bank_tokens`` and ``guided_approximation`` (the first shipped models) is a pooled bank
    without approximation blocks, and gives exactly what the network that saved it gave."""
    torch.manual_seed(0)
    net = LanguageGuidedSegNet(NetworkConfig(bank_size=5, guided_approximation=False,
                                             decoder_channels=(64, 48, 32, 24, 16)))
    net.bank.fill(torch.randn(5, 384), torch.randn(5, 384), torch.arange(5))
    net.eval()
    saved = save_package(tmp_path / "saved", net, _config(), half=False)

    def change(config: dict) -> None:
        del config["network"]["bank_tokens"], config["network"]["guided_approximation"]

    old = load_package(_resaved(saved, tmp_path / "old", change))
    assert old.config.network.bank_tokens == 0 and not old.config.network.guided_approximation
    loaded = old.build_network()
    assert not len(loaded.approximations) and loaded.bank.tokens == 0 and loaded.bank.token_mask is None
    for expected, actual in zip(_outputs(net), _outputs(loaded)):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    # The shipped packages are such packages.
    for name in ("qata-cxr", "kvasir-polyp"):
        values = json.loads((find_model(name) / CONFIG_FILE).read_text())["config"]["network"]
        if "guided_approximation" not in values:
            network = load_package(name).build_network()
            assert not len(network.approximations) and network.bank.tokens == values.get("bank_tokens", 0)
