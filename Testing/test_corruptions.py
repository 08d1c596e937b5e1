"""The corruptions of other cameras and clinics (``languageguidedseg.corruptions``) and ``lgseg evaluate --corrupt``,
which measures a model on them at fixed severities."""

from __future__ import annotations

import json

import numpy as np
import pytest

from languageguidedseg.cli import main
from languageguidedseg.corruptions import CORRUPTIONS, GEOMETRIC, Corruption, corrupt_pair, parse_corruptions
from languageguidedseg.data import load_pair, load_split
from languageguidedseg.errors import LgsegError


@pytest.fixture(autouse=True)
def one_thread_shipped_models_only(own_models_folder, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def frame(kvasir) -> np.ndarray:
    """A real colonoscopy frame (uint8 RGB)."""
    return load_pair(load_split(kvasir, "val")[0])[0]


def test_parse_corruptions_reads_a_spec_in_order_and_rejects_bad_ones():
    assert parse_corruptions("jpeg:30, blur:2") == [Corruption("jpeg", 30.0), Corruption("blur", 2.0)]
    assert [str(c) for c in parse_corruptions("colour:-0.2,gamma:1.5")] == ["colour:-0.2", "gamma:1.5"]
    for spec, words in (("fog:1", "unknown corruption"), ("jpeg", "needs a number"), ("jpeg:abc", "needs a number"),
                        ("jpeg:0", "[1, 95]"), ("saturation:-1", "[0, 10]"), ("blur:nan", "must lie")):
        with pytest.raises(LgsegError, match=words.replace("[", r"\[").replace("]", r"\]")):
            parse_corruptions(spec)


def corrupt_image(image: np.ndarray, corruptions: list[Corruption]) -> np.ndarray:
    """The corrupted image alone (the appearance corruptions leave the mask as it is)."""
    return corrupt_pair(image, None, corruptions)[0]


def _mean(image: np.ndarray) -> np.ndarray:
    return image.reshape(-1, 3).astype(float).mean(axis=0)


def test_each_corruption_changes_the_frame_as_named_and_deterministically(frame):
    for name, (_, _, severity) in CORRUPTIONS.items():
        if name in GEOMETRIC:
            continue
        corrupted = corrupt_image(frame, [Corruption(name, severity)])
        assert corrupted.shape == frame.shape and corrupted.dtype == np.uint8
        # Visibly changed (text, highlights and the round mask cover a small part of the frame).
        least = 0.4 if name in ("overlay", "specular", "fov") else 1.0
        assert np.abs(corrupted.astype(int) - frame).mean() > least, name
        assert np.array_equal(corrupted, corrupt_image(frame, [Corruption(name, severity)])), name
    # Neutral severities leave the frame as it was (up to rounding).
    for neutral in ("hue:0", "saturation:1", "colour:0", "gamma:1", "blur:0"):
        assert np.abs(corrupt_image(frame, parse_corruptions(neutral)).astype(int) - frame).max() <= 1, neutral
    # What each name says it does.
    warm = _mean(corrupt_image(frame, parse_corruptions("colour:0.2"))) - _mean(frame)
    assert warm[0] > 3 and warm[2] < -3 and abs(warm[1]) < 0.5
    grey = corrupt_image(frame, parse_corruptions("saturation:0")).astype(int)
    assert np.abs(grey[..., 0] - grey[..., 1]).max() <= 1 and np.abs(grey[..., 1] - grey[..., 2]).max() <= 1
    luma = np.array([0.299, 0.587, 0.114])
    turned = corrupt_image(frame, parse_corruptions("hue:15"))
    assert abs(float((_mean(turned) - _mean(frame)) @ luma)) < 2  # hue turns colours, keeps brightness
    darker = corrupt_image(frame, parse_corruptions("gamma:1.5"))
    assert np.median(darker) < np.median(frame)
    blurred = corrupt_image(frame, parse_corruptions("blur:2")).astype(float)
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.7 * np.abs(np.diff(frame.astype(float), axis=1)).mean()


def test_the_frames_geometry_changes_the_mask_with_it(kvasir):
    image, mask = load_pair(load_split(kvasir, "val")[0])
    height, width = mask.shape
    bordered, bordered_mask = corrupt_pair(image, mask, parse_corruptions("border:0.25"))
    pad = round(0.25 * width)
    assert bordered.shape == (height, width + 2 * pad, 3)
    assert not bordered[:, :pad].any() and not bordered[:, -pad:].any()
    assert np.array_equal(bordered_mask[:, pad:-pad], mask) and not bordered_mask[:, :pad].any()
    assert np.array_equal(bordered[:, pad:-pad], image)
    for spec, shape in (("resize:0.5", (round(height / 2), round(width / 2))), ("resize:2", (2 * height, 2 * width)),
                        ("aspect:1.33", (height, round(width * 1.33)))):
        moved_image, moved_mask = corrupt_pair(image, mask, parse_corruptions(spec))
        assert moved_image.shape[:2] == moved_mask.shape == shape and moved_mask.dtype == mask.dtype, spec
        # The lesion keeps its place and its share of the frame.
        assert abs(moved_mask.mean() - mask.mean()) < 0.01, spec
        rows, columns = np.nonzero(moved_mask)
        centre = np.array([rows.mean() / shape[0], columns.mean() / shape[1]])
        rows, columns = np.nonzero(mask)
        assert np.abs(centre - [rows.mean() / height, columns.mean() / width]).max() < 0.01, spec
    # The others leave the mask, and the geometry, as they were.
    for spec in ("overlay:6", "specular:30", "fov:0.7"):
        corrupted, same = corrupt_pair(image, mask, parse_corruptions(spec))
        assert corrupted.shape == image.shape and same is not None and np.array_equal(same, mask), spec


def test_overlay_highlights_and_field_of_view_do_what_they_say(frame):
    height, width = frame.shape[:2]
    text = corrupt_image(frame, parse_corruptions("overlay:2")).astype(int)
    changed = np.abs(text - frame).sum(axis=2) > 30
    rows = np.flatnonzero(changed.any(axis=1))
    assert changed[:, width // 2:].sum() < changed[:, :width // 2].sum()  # text on the left
    assert rows.min() < height / 8 and rows.max() > height * 7 / 8  # in the top and the bottom corner
    assert changed.mean() < 0.05
    lit = corrupt_image(frame, parse_corruptions("specular:30")).astype(int)
    assert (lit >= frame).all() and ((lit - frame).min(axis=2) > 60).sum() > 30  # white spots, nothing darker
    assert np.array_equal(corrupt_image(frame, parse_corruptions("specular:0")), frame)
    round_view = corrupt_image(frame, parse_corruptions("fov:0.5"))
    assert not round_view[0, 0].any() and not round_view[-1, -1].any()  # corners black
    assert np.array_equal(round_view[height // 2, width // 2], frame[height // 2, width // 2])
    assert np.array_equal(corrupt_image(frame, parse_corruptions("fov:1")), frame)


def test_blur_is_measured_in_network_input_pixels_whatever_the_image_size(frame):
    """A frame twice the size gets twice the sigma, so the network sees the same blur."""
    big = np.repeat(np.repeat(frame, 2, axis=0), 2, axis=1)
    small_blurred = corrupt_image(frame, parse_corruptions("blur:2")).astype(float)
    big_blurred = corrupt_image(big, parse_corruptions("blur:2")).astype(float)
    shrunk = big_blurred.reshape(frame.shape[0], 2, frame.shape[1], 2, 3).mean(axis=(1, 3))
    assert np.abs(shrunk - small_blurred).mean() < 2.0


def test_corruptions_need_8_bit_images():
    with pytest.raises(LgsegError, match="8-bit"):
        corrupt_image(np.zeros((8, 8), dtype=np.uint16), parse_corruptions("jpeg:30"))
    grey = corrupt_image(np.full((8, 8), 100, dtype=np.uint8), parse_corruptions("jpeg:90"))
    assert grey.shape == (8, 8, 3)


def test_evaluate_with_corruptions_scores_the_corrupted_frames(kvasir, capsys):
    args = ["evaluate", str(kvasir), "--model", "kvasir-polyp", "--limit", "4", "--json", "--quiet"]
    assert main(args) == 0
    clean = json.loads(capsys.readouterr().out)
    assert clean["corrupt"] is None
    assert main(args + ["--corrupt", "blur:8,jpeg:5"]) == 0
    corrupted = json.loads(capsys.readouterr().out)
    assert corrupted["corrupt"] == "blur:8,jpeg:5" and corrupted["n"] == clean["n"] == 4
    assert corrupted["dice"] < clean["dice"] - 0.01  # a heavily blurred, blocky frame is segmented worse
    assert main(args + ["--corrupt", "blur:8,jpeg:5"]) == 0
    assert json.loads(capsys.readouterr().out)["dice"] == corrupted["dice"]  # fixed severities: deterministic

    assert main(args[:-2] + ["--corrupt", "fog:2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown corruption 'fog'") and len(err.splitlines()) == 1


def test_evaluate_with_corruptions_leaves_out_the_probes_of_the_clean_images(qata, tiny_model, capsys):
    assert main(["evaluate", str(qata), "--model", str(tiny_model), "--limit", "2", "--json", "--quiet",
                 "--corrupt", "gamma:1.5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["corrupt"] == "gamma:1.5" and "steering" not in result and "laterality_n" not in result
