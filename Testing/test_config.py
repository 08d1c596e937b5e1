"""The one strict ``from_dict`` of the configuration dataclasses (network, preprocessing, model, losses)."""

from __future__ import annotations

import pytest

from languageguidedseg.config import ModelCard, ModelConfig, NetworkConfig, PreprocessConfig
from languageguidedseg.errors import LgsegError
from training.losses import LossWeights


@pytest.mark.parametrize("cls, section", [(NetworkConfig, "network"), (LossWeights, "losses"),
                                          (PreprocessConfig, "preprocessing"), (ModelConfig, "config")])
def test_a_typo_is_an_error_naming_the_key_and_the_known_ones(cls, section):
    values = {"name": "m"} if cls is ModelConfig else {}
    with pytest.raises(LgsegError) as error:
        cls.from_dict({**values, "decoder_chanels": [1]}, section)
    message = str(error.value)
    assert f"unknown key 'decoder_chanels' in {section}; known keys: " in message
    first_field = next(iter(cls.__dataclass_fields__))
    assert first_field in message.split("known keys: ")[1]


def test_nested_sections_and_lists_become_dataclasses_and_tuples():
    config = ModelConfig.from_dict({"name": "m", "segment_color": [1, 0, 0],
                                    "network": {"decoder_channels": [64, 32], "bank_size": 4}})
    assert isinstance(config.network, NetworkConfig)
    assert config.network.decoder_channels == (64, 32) and config.network.bank_size == 4
    assert config.card.segment_color == (1.0, 0.0, 0.0) and all(isinstance(c, float) for c in config.card.segment_color)
    # The way back is JSON-ready and round-trips.
    values = config.to_dict()
    assert values["network"]["decoder_channels"] == [64, 32] and values["segment_color"] == [1.0, 0.0, 0.0]
    assert ModelConfig.from_dict(values) == config


def test_the_model_cards_keys_are_the_model_configs_own():
    """model.json keeps its keys (hash-locked packages predate the card): the card's keys are read and written among
    the model's, and the card is no section of its own."""
    config = ModelConfig.from_dict({"name": "m", "task": "t", "threshold": 0.3, "preprocessing": {"size": 96}},
                                   "config")
    assert config.card == ModelCard(task="t", threshold=0.3) and config.preprocessing == PreprocessConfig(size=96)
    values = config.to_dict()
    assert "card" not in values and values["task"] == "t" and values["threshold"] == 0.3
    assert values["preprocessing"]["size"] == 96
    with pytest.raises(LgsegError, match="unknown key 'card' in config; known keys: name, network, version, task, "):
        ModelConfig.from_dict({"name": "m", "card": {}}, "config")
    with pytest.raises(LgsegError, match="config.threshold must be a number"):
        ModelConfig.from_dict({"name": "m", "threshold": "high"}, "config")


def test_an_unknown_key_in_a_nested_section_names_the_section():
    with pytest.raises(LgsegError, match="unknown key 'heds' in config.network; known keys: encoder, "):
        ModelConfig.from_dict({"name": "m", "network": {"heds": 2}}, "config")


@pytest.mark.parametrize("values, message", [
    ({"heads": "four"}, "network.heads must be a whole number, not 'four'"),
    ({"heads": True}, "network.heads must be a whole number"),
    ({"prototype_momentum": "high"}, "network.prototype_momentum must be a number"),
    ({"decoder_channels": 96}, "network.decoder_channels must be a list"),
    ({"decoder_channels": [96, "x"]}, r"network.decoder_channels\[1\] must be a whole number"),
    ("encoder: x", "network must be a mapping of keys to values, not str"),
])
def test_a_value_of_the_wrong_type_is_an_error_naming_the_key(values, message):
    with pytest.raises(LgsegError, match=message):
        NetworkConfig.from_dict(values, "network")


def test_a_missing_required_key_is_an_error():
    with pytest.raises(LgsegError, match="config needs the key name"):
        ModelConfig.from_dict({"task": "x"}, "config")


def test_a_fixed_length_tuple_checks_its_length():
    with pytest.raises(LgsegError, match="segment_color needs 3 values, got 2"):
        ModelConfig.from_dict({"name": "m", "segment_color": [1, 0]})
