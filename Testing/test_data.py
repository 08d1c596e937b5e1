"""Dataset loading on the real data in ../shared/data and on small LViT / GuideDecoder copies built from it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import dataset
from languageguidedseg.data import Sample, apply_text_ratio, load_pair, load_split
from languageguidedseg.errors import LgsegError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QATA = DATA / "qata-cov19"
KVASIR = DATA / "kvasir-seg"

needs_qata = pytest.mark.skipif(not (QATA / "split.json").is_file(), reason=f"QaTa-COV19 data not found at {QATA}")
needs_kvasir = pytest.mark.skipif(
    not (KVASIR / "split.json").is_file(), reason=f"Kvasir-SEG data not found at {KVASIR}"
)


def _split_ids(root: Path, split: str) -> list[str]:
    return json.loads((root / "split.json").read_text())[split]


def _qata_ids(count: int) -> list[str]:
    return _split_ids(QATA, "train")[:count]


def _report(sample_id: str, root: Path = QATA) -> str:
    return (root / "reports" / f"{sample_id}.txt").read_text().strip()


def _write_png(array: np.ndarray, path: Path, is_vector: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=is_vector), str(path))


def _project_copy(tmp_path: Path, ids: list[str]) -> Path:
    """A project-layout dataset with the given QaTa ids, all in split 'train'."""
    root = tmp_path / "project"
    for folder, suffix in (("images", ".png"), ("masks", ".png"), ("reports", ".txt")):
        (root / folder).mkdir(parents=True)
        for sample_id in ids:
            shutil.copy(QATA / folder / f"{sample_id}{suffix}", root / folder / f"{sample_id}{suffix}")
    (root / "split.json").write_text(json.dumps({"train": ids, "val": []}))
    return root


# --- real data -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, split, expected, image_suffix", [
    ("qata-cov19", "train", 5713, ".png"), ("qata-cov19", "val", 1429, ".png"),
    ("kvasir-seg", "train", 798, ".jpg"), ("kvasir-seg", "val", 100, ".jpg"),
])
def test_splits_load_with_their_own_reports(name: str, split: str, expected: int, image_suffix: str) -> None:
    root = dataset(name)
    samples = load_split(root, split)
    assert len(samples) == expected
    assert [s.id for s in samples] == _split_ids(root, split)
    # Every image gets its own report, the text of reports/<id>.txt, not a neighbour's or none.
    assert [s.report for s in samples] == [_report(s.id, root) for s in samples]
    assert all(s.image_path.suffix == image_suffix and s.mask_path.suffix == ".png" for s in samples)


@needs_qata
@needs_kvasir
def test_load_pair_gray_and_rgb() -> None:
    gray, gray_mask = load_pair(load_split(QATA, "val", validate=False)[0])
    assert gray.shape == (224, 224) and gray.dtype == np.uint8
    assert gray_mask.shape == (224, 224) and gray_mask.dtype == bool and gray_mask.any()
    rgb, rgb_mask = load_pair(load_split(KVASIR, "val", validate=False)[0])
    assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8
    assert rgb_mask.shape == (256, 256) and rgb_mask.dtype == bool and rgb_mask.any()


def test_load_pair_drops_alpha_and_reads_01_masks(tmp_path: Path) -> None:
    rgba = np.zeros((6, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    mask = np.zeros((6, 5), np.uint8)
    mask[1:3, 2:4] = 1
    _write_png(rgba, tmp_path / "a.png", is_vector=True)
    _write_png(mask, tmp_path / "m.png")
    image, loaded = load_pair(Sample("a", tmp_path / "a.png", tmp_path / "m.png", None))
    assert image.shape == (6, 5, 3) and (image[..., 0] == 200).all()
    assert loaded.sum() == 4 and loaded[1:3, 2:4].all()


# --- LViT and GuideDecoder layouts ----------------------------------------------------------------------------


def _write_xlsx(path: Path, rows: list[list[object]]) -> None:
    openpyxl = pytest.importorskip("openpyxl")
    workbook = openpyxl.Workbook()
    for row in rows:
        workbook.active.append(row)
    workbook.save(path)


@needs_qata
def test_lvit_layout(tmp_path: Path) -> None:
    ids = _qata_ids(9)
    parts = {"Train_Folder": ids[:5], "Val_Folder": ids[5:7], "Test_Folder": ids[7:]}
    root = tmp_path / "QaTa-COV19"
    for folder, split_ids in parts.items():
        for sample_id in split_ids:
            _copy_pair(sample_id, root / folder / "img" / f"{sample_id}.png",
                       root / folder / "labelcol" / f"{sample_id}.png")
        # pandas.to_excel writes an unnamed index column first, as in LViT's files.
        rows: list[list[object]] = [[None, "Image", "Description"]]
        rows += [[i, f"{sample_id}.png", _report(sample_id)] for i, sample_id in enumerate(split_ids)]
        _write_xlsx(root / folder / f"{folder.split('_')[0]}_text.xlsx", rows)
    for split, folder in (("train", "Train_Folder"), ("val", "Val_Folder"), ("test", "Test_Folder")):
        samples = load_split(root, split)
        assert [s.id for s in samples] == parts[folder]
        assert [s.report for s in samples] == [_report(i) for i in parts[folder]]
        assert all(s.mask_path.parent.name == "labelcol" for s in samples)
    assert [s.id for s in load_split(root, "Validation")] == parts["Val_Folder"]


@needs_qata
def test_guidedecoder_layout(tmp_path: Path) -> None:
    ids = _qata_ids(13)
    train_ids, test_ids = ids[:10], ids[10:]
    root = tmp_path / "QaTa-COV19-v2"
    for folder, split_ids in (("Train", train_ids), ("Test", test_ids)):
        for sample_id in split_ids:
            _copy_pair(sample_id, root / folder / "Images" / f"{sample_id}.png",
                       root / folder / "GTs" / f"mask_{sample_id}.png")
    (root / "prompt").mkdir()
    for name, split_ids in (("train.csv", train_ids), ("test_annotations.csv", test_ids)):
        with (root / "prompt" / name).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["Image", "Description"])
            writer.writerows([[f"mask_{i}.png", _report(i)] for i in split_ids])
    # Without a validation file, GuideDecoder's 80/20 cut of train.csv gives train and val.
    train, val, test = (load_split(root, split) for split in ("train", "val", "test"))
    assert [s.id for s in train] == train_ids[:8]
    assert [s.id for s in val] == train_ids[8:]
    assert [s.id for s in test] == test_ids
    assert all(s.report == _report(s.id) for s in train + val + test)
    assert all(s.mask_path.name == f"mask_{s.id}.png" and s.image_path.name == f"{s.id}.png" for s in test)


def _copy_pair(sample_id: str, image: Path, mask: Path) -> None:
    for source, target in ((QATA / "images" / f"{sample_id}.png", image), (QATA / "masks" / f"{sample_id}.png", mask)):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)


# --- malformed datasets ---------------------------------------------------------------------------------------


def _message(root: Path, split: str = "train") -> str:
    with pytest.raises(LgsegError) as info:
        load_split(root, split)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_root_and_unknown_layout(tmp_path: Path) -> None:
    assert "nowhere" in _message(tmp_path / "nowhere")
    (tmp_path / "stuff").mkdir()
    message = _message(tmp_path)
    assert "split.json" in message and "LViT" in message and "GuideDecoder" in message


@needs_qata
def test_unknown_split_lists_available(tmp_path: Path) -> None:
    root = _project_copy(tmp_path, _qata_ids(2))
    message = _message(root, "test")
    assert "split.json" in message and "train" in message and "val" in message


@needs_qata
def test_id_without_image(tmp_path: Path) -> None:
    ids = _qata_ids(3)
    root = _project_copy(tmp_path, ids)
    (root / "images" / f"{ids[1]}.png").unlink()
    assert f"{ids[1]}.png" in _message(root)


@needs_qata
def test_image_without_mask(tmp_path: Path) -> None:
    ids = _qata_ids(3)
    root = _project_copy(tmp_path, ids)
    (root / "masks" / f"{ids[2]}.png").unlink()
    message = _message(root)
    assert f"{ids[2]}.png" in message and "mask" in message


@needs_qata
def test_mask_of_another_size(tmp_path: Path) -> None:
    ids = _qata_ids(3)
    root = _project_copy(tmp_path, ids)
    _write_png(np.zeros((100, 120), np.uint8), root / "masks" / f"{ids[0]}.png")
    message = _message(root)
    assert f"{ids[0]}.png" in message and "120x100" in message
    with pytest.raises(LgsegError, match=ids[0]):
        load_pair(load_split(root, "train", validate=False)[0])


@needs_qata
@pytest.mark.parametrize("folder", ["images", "masks"])
def test_unreadable_file(tmp_path: Path, folder: str) -> None:
    ids = _qata_ids(3)
    root = _project_copy(tmp_path, ids)
    (root / folder / f"{ids[1]}.png").write_bytes(b"this is not a png")
    assert f"{folder}/{ids[1]}.png" in _message(root)
    with pytest.raises(LgsegError, match=f"{ids[1]}.png"):
        load_pair(load_split(root, "train", validate=False)[1])


@needs_qata
def test_missing_report_means_image_only(tmp_path: Path) -> None:
    ids = _qata_ids(3)
    root = _project_copy(tmp_path, ids)
    (root / "reports" / f"{ids[0]}.txt").unlink()
    assert [s.report is None for s in load_split(root, "train")] == [True, False, False]


def _one_image_guidedecoder_copy(tmp_path: Path) -> tuple[Path, str]:
    """A GuideDecoder-layout folder with one QaTa training image and its mask, and no annotation file yet."""
    sample_id = _qata_ids(1)[0]
    root = tmp_path / "gd"
    _copy_pair(sample_id, root / "Train" / "Images" / f"{sample_id}.png",
               root / "Train" / "GTs" / f"mask_{sample_id}.png")
    return root, sample_id


@needs_qata
def test_annotation_file_without_columns(tmp_path: Path) -> None:
    root, sample_id = _one_image_guidedecoder_copy(tmp_path)
    (root / "train.csv").write_text(f"Filename,Text\nmask_{sample_id}.png,lower left lung\n")
    message = _message(root)
    assert "train.csv" in message and "Image" in message and "Description" in message


@needs_qata
def test_annotation_row_without_image(tmp_path: Path) -> None:
    root, sample_id = _one_image_guidedecoder_copy(tmp_path)
    # The missing row comes first: without a val file, GuideDecoder's cut keeps the first 80% rows for train.
    (root / "train.csv").write_text(f"Image,Description\nmask_covid_missing.png,b\nmask_{sample_id}.png,a\n")
    assert "covid_missing" in _message(root)


# --- limited text ---------------------------------------------------------------------------------------------


def _fake_samples(count: int, with_report: int) -> list[Sample]:
    return [Sample(f"s{i}", Path(f"s{i}.png"), Path(f"m{i}.png"), "text" if i < with_report else None)
            for i in range(count)]


@needs_qata
def test_text_ratio_counts_on_qata_train() -> None:
    samples = load_split(QATA, "train", validate=False)
    counts: dict[float, int] = {}
    for ratio in (0.0, 0.01, 0.25, 1.0):
        kept = apply_text_ratio(samples, ratio, seed=0)
        assert [s.id for s in kept] == [s.id for s in samples]
        counts[ratio] = sum(s.report is not None for s in kept)
    assert counts == {0.0: 0, 0.01: 57, 0.25: 1428, 1.0: 5713}


def test_text_ratio_is_seeded() -> None:
    samples = _fake_samples(200, 150)
    first = apply_text_ratio(samples, 0.25, seed=7)
    assert first == apply_text_ratio(samples, 0.25, seed=7)
    assert first != apply_text_ratio(samples, 0.25, seed=8)
    assert sum(s.report is not None for s in first) == 38  # round(0.25 * 150) = 37.5, rounded half up
    assert all(s.report is None for s in first[150:])
    assert sum(s.report is not None for s in apply_text_ratio(samples, 0.001, seed=0)) == 1


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_text_ratio_out_of_range(ratio: float) -> None:
    with pytest.raises(LgsegError, match="ratio"):
        apply_text_ratio(_fake_samples(3, 3), ratio, seed=0)
