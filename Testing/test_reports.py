"""Report pseudo-labels: every real QaTa / Kvasir report, plus hand-written variants."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from languageguidedseg.errors import LgsegError
from languageguidedseg.reports import (
    KVASIR_LOCATIONS,
    ZONES,
    ReportLabels,
    get_parser,
    parse_qata_report,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QATA = DATA / "qata-cov19"
KVASIR = DATA / "kvasir-seg"


def _reports(root: Path, split: str) -> Counter:
    if not (root / "split.json").is_file():
        pytest.skip(f"dataset not found at {root}")
    ids = json.loads((root / "split.json").read_text())[split]
    return Counter((root / "reports" / f"{i}.txt").read_text(encoding="utf-8").strip() for i in ids)


def _zones(*names: str) -> tuple:
    return tuple(zone in names for zone in ZONES)


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_qata_report_parses_consistently(split: str) -> None:
    reports = _reports(QATA, split)
    print(f"{split}: {sum(reports.values())} QaTa reports, {len(reports)} distinct")
    counts_below_sides = 0
    for text, copies in reports.items():
        labels = parse_qata_report(text)
        left, right = any(labels.zones[:3]), any(labels.zones[3:])
        assert left or right, text
        assert labels.laterality in ("unilateral", "bilateral"), text
        assert (labels.laterality == "bilateral") == (left and right), text
        assert labels.count is not None and 1 <= labels.count <= 6, text
        # The annotators sometimes wrote "one infected area" for a bilateral finding.
        counts_below_sides += copies * (labels.count < left + right)
    assert counts_below_sides <= 0.01 * sum(reports.values())


@pytest.mark.parametrize(
    "text, expected",
    [
        ("bilateral pulmonary infection, two infected areas, lower left lung and middle lower right lung.",
         ReportLabels(_zones("left lower", "right middle", "right lower"), "bilateral", 2)),
        ("bilateral pulmonary infection, two infected areas, all left lung and all right lung.",
         ReportLabels((True,) * 6, "bilateral", 2)),
        ("unilateral pulmonary infection, one infected area, upper middle lower right lung.",
         ReportLabels(_zones("right upper", "right middle", "right lower"), "unilateral", 1)),
        ("unilateral pulmonary infection, one infected area, middle left lung.",
         ReportLabels(_zones("left middle"), "unilateral", 1)),
        ("unilateral pulmonary infection, two infected areas, upper lower left lung.",
         ReportLabels(_zones("left upper", "left lower"), "unilateral", 2)),
        # Real oddities: a phrase without side takes the other side; explicit levels win over "all".
        ("bilateral pulmonary infection, two infected areas, all lung and all right lung.",
         ReportLabels((True,) * 6, "bilateral", 2)),
        ("bilateral pulmonary infection, two infected areas, all lower left lung and lower right lung.",
         ReportLabels(_zones("left lower", "right lower"), "bilateral", 2)),
        # Digits, capitals, extra spaces, typos, missing laterality.
        ("  Bilaterial pulmonary  infection, 3 infected areas, Lower LEFT lung and upper rigth lung ",
         ReportLabels(_zones("left lower", "right upper"), "bilateral", 3)),
        ("pulmonary infection, ten infected areas, lower left and right lung",
         ReportLabels(_zones("left lower", "right lower"), None, 10)),
        ("bilateral pulmonary infection, lower lung.",
         ReportLabels(_zones("left lower", "right lower"), "bilateral", None)),
        ("left lung", ReportLabels(_zones("left upper", "left middle", "left lower"), None, None)),
        ("unilateral pulmonary infection, one infected area, lower lung.",
         ReportLabels((False,) * 6, "unilateral", 1)),
        ("no finding", ReportLabels((False,) * 6, None, None)),
    ],
)
def test_qata_examples(text: str, expected: ReportLabels) -> None:
    assert parse_qata_report(text) == expected


def test_parser_registry() -> None:
    assert get_parser(None) is None and get_parser("none") is None and get_parser("None") is None
    qata, kvasir = get_parser("qata"), get_parser("KVASIR")
    assert qata is not None and qata.name == "qata" and qata.classes == ZONES
    assert kvasir is not None and kvasir.name == "kvasir" and kvasir.classes == KVASIR_LOCATIONS
    assert qata.parse("unilateral pulmonary infection, one infected area, upper left lung.") == _zones("left upper")
    with pytest.raises(LgsegError, match="qata, kvasir, none"):
        get_parser("chexpert")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("one medium white round polyp, located in center of the image", {"center"}),
        ("one small white round polyp, located in bottom right of the image", {"bottom right"}),
        ("two large white round polyp, located in top left, right of the image", {"top left", "right"}),
        ("three polyps, located in top, left, bottom, bottom left of the image",
         {"top", "left", "bottom", "bottom left"}),
        ("a polyp in the upper-left centre", {"top left", "center"}),
    ],
)
def test_kvasir_examples(text: str, expected: set) -> None:
    parser = get_parser("kvasir")
    assert parser is not None
    assert {c for c, present in zip(parser.classes, parser.parse(text)) if present} == expected


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_kvasir_report_names_a_location(split: str) -> None:
    parser = get_parser("kvasir")
    assert parser is not None
    for text in _reports(KVASIR, split):
        flags = parser.parse(text)
        assert len(flags) == len(KVASIR_LOCATIONS) and any(flags), text
