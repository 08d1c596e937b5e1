"""Pseudo-labels from report text, used to group samples per class when the prototype bank is clustered.

Two parsers share one interface, :class:`ReportParser`: ``parse(text)`` returns one bool per entry of ``classes``.

- ``qata``: the LViT annotation scheme of QaTa-COV19, e.g. "bilateral pulmonary infection, two infected areas,
  lower left lung and middle lower right lung." Classes are the six lung zones of :data:`ZONES`; "left" and
  "right" name the sides of the image as displayed. :func:`parse_qata_report` also gives laterality and count.
- ``kvasir``: the MedVLSM ``p6`` prompts of Kvasir-SEG, e.g. "one medium white round polyp, located in top left,
  center of the image". Classes are the nine image locations of :data:`KVASIR_LOCATIONS`.

``get_parser(None)`` / ``get_parser("none")`` means no parser: the bank is clustered without labels.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import LgsegError

ZONES = ("left upper", "left middle", "left lower", "right upper", "right middle", "right lower")
KVASIR_LOCATIONS = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)

_SIDES = ("left", "right")
_LEVELS = ("upper", "middle", "lower")
_NUMBERS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "single": 1, "a": 1, "an": 1,
}
# Words of the zone phrases and their synonyms; anything else in a phrase is ignored.
_ZONE_WORDS = {
    "left": "left", "right": "right", "both": "both",
    "upper": "upper", "top": "upper", "apical": "upper", "apex": "upper", "superior": "upper",
    "middle": "middle", "mid": "middle", "central": "middle",
    "lower": "lower", "bottom": "lower", "basal": "lower", "base": "lower", "inferior": "lower",
    "all": "all", "whole": "all", "entire": "all",
}
# Typo correction only for longer words, so that short words such as "and" or "a" are never rewritten.
_TYPO_VOCABULARY = ("left", "right", "upper", "middle", "lower", "lung", "lungs", "bilateral", "unilateral")
# A zone phrase ends at "lung" (or a synonym), a comma, a semicolon or a full stop.
_PHRASE_END = re.compile(r"\b(?:lungs?|lobes?|fields?|zones?|regions?)\b|[,;.]")


@dataclass(frozen=True)
class ReportLabels:
    """What a QaTa report says: the infected zones (in :data:`ZONES` order), laterality and number of areas."""

    zones: tuple[bool, ...]
    laterality: Optional[str]
    count: Optional[int]


@dataclass(frozen=True)
class ReportParser:
    """A named report parser: ``parse(text)`` gives one bool per entry of ``classes``."""

    name: str
    classes: tuple[str, ...]
    parse: Callable[[str], tuple[bool, ...]]


def parse_qata_report(text: str) -> ReportLabels:
    """Zones, laterality and infected-area count of a QaTa/LViT report.

    Each zone phrase ("middle lower right lung", "all left lung", "lower left and right lung") is read on its own:
    a side without level words means the whole side ("left lung" = "all left lung"); explicit levels win over
    "all" ("all lower left lung" = lower left). A phrase without a side ("lower lung") takes, in a unilateral
    report, the side the other phrases name; otherwise the side no other phrase names, else both sides. Unstated
    laterality or count stays None; no zone found gives six False.
    """
    words = _correct_typos(_tokens(text))
    normalized = " ".join(words)
    laterality = _laterality(normalized)
    count = _count(normalized)
    phrases = [_read_phrase(part) for part in _PHRASE_END.split(normalized)]
    phrases = [(sides, levels) for sides, levels in phrases if sides or levels]
    named_sides = {side for sides, _ in phrases for side in sides}
    zones = set()
    for sides, levels in phrases:
        if not sides:
            if laterality == "unilateral":
                sides = named_sides if len(named_sides) == 1 else set()
            elif len(named_sides) == 1:
                sides = set(_SIDES) - named_sides
            else:
                sides = set(_SIDES)
        for side in sides:
            for level in levels or _LEVELS:
                zones.add(f"{side} {level}")
    return ReportLabels(tuple(zone in zones for zone in ZONES), laterality, count)


def parse_qata_zones(text: str) -> tuple[bool, ...]:
    """The six zone flags of :func:`parse_qata_report` (the ``qata`` parser's ``parse``)."""
    return parse_qata_report(text).zones


def parse_kvasir_locations(text: str) -> tuple[bool, ...]:
    """Which of :data:`KVASIR_LOCATIONS` a Kvasir report names ("located in top left, center of the image")."""
    lowered = text.lower()
    located = re.search(r"located\s+(?:in|at|on)\s+(.*?)(?:\s+(?:of|in)\s+the\s+image|$)", lowered)
    part = located.group(1) if located else lowered
    part = re.sub(r"\bcent(?:re|ral|er)\b|\bmiddle\b", "center", part)
    part = re.sub(r"\bupper\b", "top", re.sub(r"\blower\b", "bottom", part))
    found = set()
    for match in re.finditer(r"\b(?:(top|bottom)[\s-]*(left|right)|top|bottom|left|right|center)\b", part):
        found.add(f"{match.group(1)} {match.group(2)}" if match.group(1) else match.group(0))
    return tuple(location in found for location in KVASIR_LOCATIONS)


def get_parser(name: Optional[str]) -> Optional[ReportParser]:
    """The parser called ``name`` ("qata", "kvasir"), or None for None / "none" (cluster without labels)."""
    if name is None or name.strip().lower() in ("", "none"):
        return None
    parsers = _parsers()
    parser = parsers.get(name.strip().lower())
    if parser is None:
        raise LgsegError(f"unknown report parser '{name}'; choose one of: {', '.join(parsers)}, none")
    return parser


def _parsers() -> dict[str, ReportParser]:
    return {
        "qata": ReportParser("qata", ZONES, parse_qata_zones),
        "kvasir": ReportParser("kvasir", KVASIR_LOCATIONS, parse_kvasir_locations),
    }


def _tokens(text: str) -> list[str]:
    """Lower-case words and the punctuation that ends zone phrases."""
    return re.findall(r"[a-z]+|\d+|[,;.]", text.lower())


def _correct_typos(words: list[str]) -> list[str]:
    corrected = []
    for word in words:
        if len(word) >= 4 and word not in _ZONE_WORDS and word not in _TYPO_VOCABULARY:
            close = difflib.get_close_matches(word, _TYPO_VOCABULARY, n=1, cutoff=0.8)
            word = close[0] if close else word
        corrected.append(word)
    return corrected


def _laterality(text: str) -> Optional[str]:
    match = re.search(r"\b(unilateral|bilateral)\b", text)
    return match.group(1) if match else None


def _count(text: str) -> Optional[int]:
    numbers = "|".join(_NUMBERS)
    match = re.search(rf"\b({numbers}|\d+) (?:[a-z]+ ){{0,2}}?(?:areas?|regions?|lesions?|foci|opacities)\b", text)
    if match is None:
        return None
    word = match.group(1)
    return int(word) if word.isdigit() else _NUMBERS.get(word)


def _read_phrase(part: str) -> tuple[set, tuple[str, ...]]:
    """(sides, levels) named in one zone phrase; "all" / "whole" expands to the three levels."""
    sides, levels, whole = set(), [], False
    for word in part.split():
        meaning = _ZONE_WORDS.get(word)
        if meaning in _SIDES:
            sides.add(meaning)
        elif meaning == "both":
            sides.update(_SIDES)
        elif meaning in _LEVELS and meaning not in levels:
            levels.append(meaning)
        elif meaning == "all":
            whole = True
    if whole and not levels:
        # "all" alone still makes a phrase, so "all lung" can take its side from the other phrase.
        levels = list(_LEVELS)
    return sides, tuple(levels)
