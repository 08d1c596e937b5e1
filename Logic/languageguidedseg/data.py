"""Image + mask + report datasets for training and ``lgseg evaluate``.

``load_split(root, split)`` detects one of these layouts under ``root`` (folder and file names are matched
case-insensitively; image and mask files may be .png, .jpg, .jpeg, .bmp, .tif or .tiff):

1. Project layout (``root/split.json`` exists)::

       images/<id>.png|.jpg    masks/<id>.png    reports/<id>.txt (optional: no file = no report)
       split.json              {"train": [ids...], "val": [ids...], "test": [...] (optional)}
       dataset.json            {"report_sides": "image" | "patient" | "none"} (optional; see dataset_report_sides)

   A split name missing from split.json also matches its aliases (``valid`` finds ``val``).

2. Annotation-file layout of LViT and GuideDecoder (Ariadne's Thread): a CSV or XLSX file with the columns
   ``Image`` and ``Description`` per split, plus an image folder and a mask folder::

       LViT:         Train_Folder/img/  Train_Folder/labelcol/  Train_Folder/Train_text.xlsx
                     Val_Folder/...Val_text.xlsx                Test_Folder/...Test_text.xlsx
       GuideDecoder: Train/Images/  Train/GTs/  Test/Images/  Test/GTs/
                     prompt/train.csv  prompt/test.csv  (or train_annotations.csv, test_annotations.csv)

   - Split folders: ``<split>``, ``<split>_folder``, ``<split> set`` (e.g. ``Train``, ``Val_Folder``,
     ``Test Set``), with the split spelled train/training, val/valid/validation or test/testing. When there is no
     split folder at all, ``root`` itself may hold the image and mask folders.
   - Image folders: images, image, imgs, img. Mask folders: gts, gt, labelcol, masks, mask, labels, ground-truths.
   - Annotation file of a split: a .csv or .xlsx whose name is the split word optionally followed by annotations,
     annotation, text, texts, prompt, prompts, captions or reports (``train.csv``, ``Train_text.xlsx``,
     ``test_annotations.csv``); it is looked for in the split folder, in ``root`` and in ``root``'s other
     sub-folders (``prompt/``, ``annotations/``, ...).
   - ``Image`` holds an image or mask file name, with or without extension and ``mask_`` prefix (GuideDecoder lists
     ``mask_covid_1.png``). The image is the entry without ``mask_``; the mask is ``mask_<image>`` or has the image's
     name (LViT). The sample id is the image file name without extension.
   - Without a validation annotation file and folder, ``val`` is the last 20% of the train annotation rows and
     ``train`` the first 80%, exactly as GuideDecoder splits ``train.csv``; for QaTa's 7145 training rows this is
     the 5716 / 1429 split of ProLearn and SGSeg. Old .xls files are found but must be re-saved as .xlsx or .csv.

Duplicate ids within a split keep their first occurrence.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .errors import LgsegError
from .fileio import PathLike
from .sides import REPORT_SIDES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ANNOTATION_SUFFIXES = (".csv", ".xlsx", ".xls")
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
IMAGE_DIRS = ("images", "image", "imgs", "img")
MASK_DIRS = ("gts", "gt", "labelcol", "masks", "mask", "labels", "groundtruths", "groundtruth")
_FOLDER_SUFFIXES = ("", "folder", "set", "data")
_ANNOTATION_WORDS = {"annotations", "annotation", "text", "texts", "prompt", "prompts", "captions", "reports"}
# GuideDecoder's protocol: the first 80% of train.csv rows train, the rest validate.
_GUIDEDECODER_TRAIN_FRACTION = 0.8
_MASK_PREFIX = "mask_"

ACCEPTED_LAYOUTS = (
    "project layout (split.json, images/, masks/, reports/), "
    "LViT layout (Train_Folder/img, Train_Folder/labelcol, Train_Folder/Train_text.xlsx, ...) or "
    "GuideDecoder layout (Train/Images, Train/GTs, prompt/train.csv with columns Image and Description)"
)


@dataclass(frozen=True)
class Sample:
    """One image with its mask and optional report (None = image only)."""

    id: str
    image_path: Path
    mask_path: Path
    report: Optional[str]


@dataclass(frozen=True)
class _AnnotationLayout:
    """Where the splits of an LViT / GuideDecoder dataset live."""

    split_folders: dict[str, Path]  # canonical split -> folder holding the image and mask folders
    annotation_files: dict[str, Path]  # canonical split -> CSV/XLSX
    data_root: Optional[Path]  # root itself when it holds the image and mask folders


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def load_split(root: PathLike, split: str, validate: bool = True) -> list[Sample]:
    """Samples of ``split`` under ``root`` (layout auto-detected, see the module docstring).

    Image and mask existence is always checked; ``validate`` also reads every image and mask header to check that
    the files are readable 2D images of equal size (about 0.3 ms per file).
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise LgsegError(f"dataset folder '{root_path}' does not exist or is not a folder; pass the dataset's folder")
    split_json = _child(root_path, "split.json", want_dir=False)
    if split_json is not None:
        samples = _load_project_split(root_path, split_json, split)
    else:
        layout = _detect_annotation_layout(root_path)
        if layout is None:
            raise LgsegError(f"'{root_path}' has no dataset layout that is understood; use the {ACCEPTED_LAYOUTS}")
        samples = _load_annotation_split(root_path, layout, split)
    if validate:
        reader = sitk.ImageFileReader()
        for sample in samples:
            _check_pair(sample, reader)
    return samples


def dataset_report_sides(root: PathLike) -> Optional[str]:
    """What left and right mean in the data set's reports, from ``root/dataset.json`` (``{"report_sides": ...}``:
    "image", "patient" or "none"); None when the data set does not say."""
    path = Path(root).expanduser() / "dataset.json"
    if not path.is_file():
        return None
    sides = _json_object(path, 'such as {"report_sides": "image"}').get("report_sides")
    if sides is not None and sides not in REPORT_SIDES:
        raise LgsegError(f"'{path}' has report_sides {sides!r}; use one of {', '.join(REPORT_SIDES)}")
    return sides


def load_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """The image as uint8/uint16 (H, W) or (H, W, 3) array and the mask as bool (H, W)."""
    image = _read_pixels(sample.image_path, "image")
    if image.ndim == 3:
        # RGBA drops alpha; gray + alpha keeps gray.
        image = image[..., :3] if image.shape[2] >= 3 else image[..., 0]
    if image.dtype not in (np.uint8, np.uint16):
        raise LgsegError(
            f"image '{sample.image_path}' has pixel type {image.dtype}; save it as an 8- or 16-bit PNG or JPEG"
        )
    mask = _read_pixels(sample.mask_path, "mask")
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.shape != image.shape[:2]:
        raise LgsegError(
            f"mask '{sample.mask_path}' is {mask.shape[1]}x{mask.shape[0]} but its image '{sample.image_path}' is "
            f"{image.shape[1]}x{image.shape[0]}; resample the mask to the image size"
        )
    return np.ascontiguousarray(image), _binarize_mask(mask)


def apply_text_ratio(samples: Sequence[Sample], ratio: float, seed: int) -> list[Sample]:
    """ProLearn's limited-text protocol: a seeded random ``ratio`` of the samples with a report keep it.

    round(ratio * n_with_report) samples (half up; at least 1 when ratio > 0) keep their report, the others get
    None. The order of ``samples`` is kept; the same seed gives the same subset.
    """
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        ratio = math.nan
    if not 0.0 <= ratio <= 1.0:  # also rejects NaN
        raise LgsegError(f"text ratio {ratio!r} is outside [0, 1]; give a fraction such as 0.25 for 25%",
                         option="text_ratio")
    with_report = [i for i, sample in enumerate(samples) if sample.report is not None]
    keep_count = math.floor(ratio * len(with_report) + 0.5)
    if ratio > 0 and with_report:
        keep_count = max(1, keep_count)
    keep = set(random.Random(seed).sample(with_report, keep_count))
    return [s if i in keep or s.report is None else replace(s, report=None) for i, s in enumerate(samples)]


# ---------------------------------------------------------------------------------------------------------------
# Project layout
# ---------------------------------------------------------------------------------------------------------------


def _json_object(path: Path, what: str) -> dict:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LgsegError(f"cannot read '{path}' ({exc.__class__.__name__}); fix it to be a JSON object") from None
    if not isinstance(values, dict):
        raise LgsegError(f"'{path}' is not a JSON object {what}; fix its contents")
    return values


def _load_project_split(root: Path, split_json: Path, split: str) -> list[Sample]:
    splits = _json_object(split_json, "of split name -> ids")
    key = _project_split_key(splits, split)
    if key is None:
        raise LgsegError(
            f"split '{split}' is not in '{split_json}'; available splits: {', '.join(map(str, splits)) or 'none'}"
        )
    ids = splits[key]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise LgsegError(f"split '{key}' in '{split_json}' is not a list of id strings; fix the file")
    images_dir = _require_dir(root, ("images",), split_json)
    masks_dir = _require_dir(root, ("masks",), split_json)
    reports_dir = _child(root, "reports", want_dir=True)
    images, masks = _index_images(images_dir), _index_images(masks_dir)
    reports = _index_files(reports_dir, (".txt",)) if reports_dir is not None else {}
    samples = []
    for sample_id in dict.fromkeys(ids):  # drops duplicate ids, keeps order
        image = images.get(sample_id.lower())
        if image is None:
            raise LgsegError(
                f"split '{key}' in '{split_json}' lists '{sample_id}' but there is no image "
                f"'{images_dir / (sample_id + '.png')}' (or .jpg); add the image or remove the id from split.json"
            )
        mask = masks.get(sample_id.lower())
        if mask is None:
            raise LgsegError(
                f"image '{image}' has no mask '{masks_dir / (sample_id + '.png')}'; add the mask or remove "
                f"'{sample_id}' from '{split_json}'"
            )
        report_file = reports.get(sample_id.lower())
        samples.append(Sample(sample_id, image, mask, _read_report(report_file) if report_file else None))
    return samples


def _project_split_key(splits: dict, split: str) -> Optional[str]:
    if split in splits:
        return split
    wanted = _canonical_split(split)
    for key in splits:
        if wanted is not None and _canonical_split(str(key)) == wanted:
            return str(key)
    return None


def _read_report(path: Path) -> Optional[str]:
    try:
        text = path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise LgsegError(f"cannot read report '{path}' ({exc.__class__.__name__}); save it as UTF-8 text") from None
    return text or None


# ---------------------------------------------------------------------------------------------------------------
# LViT / GuideDecoder layout
# ---------------------------------------------------------------------------------------------------------------


def _detect_annotation_layout(root: Path) -> Optional[_AnnotationLayout]:
    split_folders: dict[str, Path] = {}
    for child in _sorted_children(root):
        if child.is_dir():
            split = _split_of_folder(child.name)
            if split is not None and split not in split_folders and _image_mask_dirs(child) is not None:
                split_folders[split] = child
    data_root = root if _image_mask_dirs(root) is not None else None
    if not split_folders and data_root is None:
        return None
    # Split folders are searched before root and its other sub-folders (prompt/, annotations/, ...).
    search = list(split_folders.values()) + [root]
    search += [c for c in _sorted_children(root) if c.is_dir() and c not in split_folders.values()
               and _normalize(c.name) not in IMAGE_DIRS + MASK_DIRS]
    annotation_files: dict[str, Path] = {}
    for folder in search:
        for candidate in _sorted_children(folder):
            split = _split_of_annotation(candidate)
            if split is not None and split not in annotation_files:
                annotation_files[split] = candidate
    return _AnnotationLayout(split_folders, annotation_files, data_root)


def _load_annotation_split(root: Path, layout: _AnnotationLayout, split: str) -> list[Sample]:
    if not layout.annotation_files:
        raise LgsegError(
            f"'{root}' has image and mask folders but no annotation file such as train.csv or Train_text.xlsx with "
            f"columns Image and Description; add one per split"
        )
    canonical = _canonical_split(split)
    derived_val = "val" not in layout.annotation_files and "val" not in layout.split_folders
    available = set(layout.annotation_files)
    if derived_val and "train" in available:
        available.add("val")
    if canonical not in available:
        raise LgsegError(
            f"split '{split}' has no annotation file under '{root}'; available splits: {', '.join(sorted(available))}"
        )
    # GuideDecoder carves train/val from one file; every other split reads its own file.
    carve = derived_val and canonical in ("train", "val")
    source = "train" if carve else canonical
    annotation_file = layout.annotation_files[source]
    rows = _read_annotations(annotation_file)
    if carve:
        cut = int(_GUIDEDECODER_TRAIN_FRACTION * len(rows))
        rows = rows[:cut] if canonical == "train" else rows[cut:]
    # A split without its own folder (GuideDecoder's val, a hand-made val.csv) takes its images from Train.
    folder = layout.split_folders.get(canonical) or layout.data_root or layout.split_folders.get("train")
    if folder is None:
        raise LgsegError(
            f"annotation file '{annotation_file}' has no image folder for split '{split}'; put its images and masks "
            f"in '{root}/{source.capitalize()}/Images' and '{root}/{source.capitalize()}/GTs'"
        )
    dirs = _image_mask_dirs(folder)
    assert dirs is not None  # layout detection only keeps folders that have both
    images_dir, masks_dir = dirs
    images, masks = _index_images(images_dir), _index_images(masks_dir)
    samples: dict[str, Sample] = {}
    for entry, report in rows:
        name = _strip_image_suffix(entry)
        base = name[len(_MASK_PREFIX):] if name.lower().startswith(_MASK_PREFIX) else name
        image = images.get(base.lower()) or images.get(name.lower())
        if image is None:
            raise LgsegError(
                f"annotation file '{annotation_file}' lists '{entry}' but there is no image '{base}' "
                f"(.png/.jpg) in '{images_dir}'; add the image or remove the row"
            )
        sample_id = _strip_image_suffix(image.name)
        mask = masks.get((_MASK_PREFIX + base).lower()) or masks.get(base.lower()) or masks.get(name.lower())
        if mask is None:
            raise LgsegError(
                f"image '{image}' has no mask '{_MASK_PREFIX}{base}.png' or '{base}.png' in '{masks_dir}'; "
                f"add the mask or remove the row from '{annotation_file}'"
            )
        if sample_id not in samples:
            samples[sample_id] = Sample(sample_id, image, mask, report)
    return list(samples.values())


def _read_annotations(path: Path) -> list[tuple[str, Optional[str]]]:
    """(Image, Description) rows of a CSV or XLSX annotation file; empty descriptions become None."""
    suffix = path.suffix.lower()
    if suffix == ".xls":
        raise LgsegError(f"annotation file '{path}' is an old .xls workbook; re-save it as .xlsx or .csv")
    table = _read_xlsx(path) if suffix == ".xlsx" else _read_csv(path)
    if not table:
        raise LgsegError(f"annotation file '{path}' is empty; it needs a header row with Image and Description")
    header = [str(cell).strip().lower() if cell is not None else "" for cell in table[0]]
    if "image" not in header or "description" not in header:
        found = ", ".join(h for h in header if h) or "none"
        raise LgsegError(
            f"annotation file '{path}' lacks the columns Image and Description (found: {found}); rename its columns"
        )
    image_col, text_col = header.index("image"), header.index("description")
    rows = []
    for row in table[1:]:
        entry = _cell(row, image_col)
        if entry:
            rows.append((entry, _cell(row, text_col) or None))
    return rows


def _cell(row: Sequence[object], index: int) -> str:
    value = row[index] if index < len(row) else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _read_csv(path: Path) -> list[list[str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        reason = exc.__class__.__name__
        raise LgsegError(f"cannot read annotation file '{path}' ({reason}); save it as UTF-8 CSV") from None


def _read_xlsx(path: Path) -> list[list[object]]:
    try:
        import openpyxl  # optional dependency: only XLSX annotations need it
    except ImportError:
        raise LgsegError(
            f"reading '{path}' needs openpyxl; install it (pip install openpyxl) or save the file as CSV"
        ) from None
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            rows = [list(row) for row in workbook.worksheets[0].iter_rows(values_only=True)]
        finally:
            workbook.close()
    except Exception as exc:  # openpyxl raises many types for damaged files
        reason = exc.__class__.__name__
        raise LgsegError(f"cannot read annotation file '{path}' ({reason}); re-save it as XLSX or CSV") from None
    return [row for row in rows if any(cell not in (None, "") for cell in row)]


def _split_of_folder(name: str) -> Optional[str]:
    key = _normalize(name)
    for split, aliases in SPLIT_ALIASES.items():
        if any(key == alias + suffix for alias in aliases for suffix in _FOLDER_SUFFIXES):
            return split
    return None


def _split_of_annotation(path: Path) -> Optional[str]:
    if path.suffix.lower() not in ANNOTATION_SUFFIXES or path.name.startswith("~$") or not path.is_file():
        return None
    words = [w for w in re.split(r"[\s_\-.]+", path.stem.lower()) if w]
    if not words or not set(words[1:]) <= _ANNOTATION_WORDS:
        return None
    return _canonical_split(words[0])


def _canonical_split(name: str) -> Optional[str]:
    key = _normalize(name)
    for split, aliases in SPLIT_ALIASES.items():
        if key in aliases:
            return split
    return None


def _image_mask_dirs(folder: Path) -> Optional[tuple[Path, Path]]:
    images = next((c for c in _sorted_children(folder) if c.is_dir() and _normalize(c.name) in IMAGE_DIRS), None)
    masks = next((c for c in _sorted_children(folder) if c.is_dir() and _normalize(c.name) in MASK_DIRS), None)
    return (images, masks) if images is not None and masks is not None else None


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def _normalize(name: str) -> str:
    """Lower case without separators, so 'Train_Folder', 'train folder' and 'Ground-truths' compare easily."""
    return re.sub(r"[\s_\-]+", "", name.lower())


def _sorted_children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _child(folder: Path, name: str, want_dir: bool) -> Optional[Path]:
    """Case-insensitive lookup of one entry of ``folder``."""
    for child in _sorted_children(folder):
        if child.name.lower() == name.lower() and (child.is_dir() if want_dir else child.is_file()):
            return child
    return None


def _require_dir(root: Path, names: tuple[str, ...], owner: Path) -> Path:
    for name in names:
        found = _child(root, name, want_dir=True)
        if found is not None:
            return found
    raise LgsegError(f"'{owner}' needs a folder '{root / names[0]}' beside it; create it or fix the dataset path")


def _index_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Lower-case stem -> file for the files of ``folder`` with one of ``suffixes`` (one directory scan)."""
    index: dict[str, Path] = {}
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_file())
    for name in names:
        suffix = os.path.splitext(name)[1].lower()
        if suffix in suffixes:
            index.setdefault(name[: -len(suffix)].lower(), folder / name)
    return index


def _index_images(folder: Path) -> dict[str, Path]:
    return _index_files(folder, IMAGE_SUFFIXES)


def _strip_image_suffix(name: str) -> str:
    stem, suffix = os.path.splitext(name)
    return stem if suffix.lower() in IMAGE_SUFFIXES else name


def _read_header(path: Path, role: str, reader: sitk.ImageFileReader) -> tuple[int, int]:
    """(width, height) from the file header only."""
    try:
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except RuntimeError:
        raise LgsegError(f"cannot read {role} file '{path}'; replace it with a valid PNG or JPEG image") from None
    size = reader.GetSize()
    if len(size) != 2 and not (len(size) == 3 and size[2] == 1):
        raise LgsegError(f"{role} file '{path}' is not a 2D image (size {size}); use 2D PNG or JPEG files")
    return int(size[0]), int(size[1])


def _check_pair(sample: Sample, reader: sitk.ImageFileReader) -> None:
    image_size = _read_header(sample.image_path, "image", reader)
    mask_size = _read_header(sample.mask_path, "mask", reader)
    if image_size != mask_size:
        raise LgsegError(
            f"mask '{sample.mask_path}' is {mask_size[0]}x{mask_size[1]} but its image '{sample.image_path}' is "
            f"{image_size[0]}x{image_size[1]}; resample the mask to the image size"
        )


def _read_pixels(path: Path, role: str) -> np.ndarray:
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError:
        raise LgsegError(f"cannot read {role} file '{path}'; replace it with a valid PNG or JPEG image") from None
    if array.ndim == 4 and array.shape[0] == 1:  # single-slice 3D file
        array = array[0]
    elif array.ndim == 3 and array.shape[0] == 1 and array.shape[2] > 4:
        array = array[0]
    if array.ndim not in (2, 3):
        raise LgsegError(f"{role} file '{path}' is not a 2D image (shape {array.shape}); use 2D PNG or JPEG files")
    return array


def _binarize_mask(mask: np.ndarray) -> np.ndarray:
    """0/1 masks: > 0; 8-bit scale (0/255, JPEG noise): > 127; 16-bit scale: > 32767."""
    top = mask.max() if mask.size else 0
    threshold = 0 if top <= 1 else (127 if top <= 255 else 32767)
    return np.asarray(mask > threshold, dtype=bool)
