"""Batch segmentation (``lgseg segment FOLDER|MANIFEST --output FOLDER``), driven as a user does: the real command in
a subprocess, on small subsets of the real data sets in ../shared/data."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import languageguidedseg
from conftest import DATA_ROOT, QATA_REPORT, dataset
from languageguidedseg.imageio import read_mask

PACKAGE_PARENT = Path(languageguidedseg.__file__).resolve().parents[1]
COLUMNS = ["image", "output", "model", "report_source", "similarity", "in_domain", "report_warnings",
           "foreground_fraction", "volume_ml", "seconds", "error"]


def _command(*args: object) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # one thread per worker: fast on a busy machine
    env.pop("LGSEG_DEBUG", None)
    if PACKAGE_PARENT.name not in ("site-packages", "dist-packages"):  # testing the checkout, not an installation
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    return [sys.executable, "-m", "languageguidedseg.cli", *map(str, args)], env


def lgseg(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    command, env = _command(*args)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "results.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _leftovers(folder: Path) -> list[str]:
    """Temporary files of an atomic write (hidden, '.tmp' in the name) left in the output folder."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp" in p.name)


def _qata_images(count: int) -> list[Path]:
    qata = dataset("qata-cov19")
    ids = json.loads((qata / "split.json").read_text())["val"][:count]
    return [qata / "images" / f"{sample_id}.png" for sample_id in ids]


def _link(target: Path, link: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=target.is_dir())
    return link


CT_EXAMPLES = DATA_ROOT / "ct-examples"


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """A folder of three QaTa val X-rays (one in a sub-folder), a CT volume (four slices of ct-examples' NIfTI), a
    DICOM series in a sub-folder (four files of ct-examples' series), a file that is no image, a cut-off JPEG and a
    text file, segmented with qata-cxr by one worker process."""
    if not (CT_EXAMPLES / "ct.nii.gz").is_file():
        pytest.skip(f"the CT examples are not at {CT_EXAMPLES} (the tests read ../shared/data beside the checkout)")
    root = tmp_path_factory.mktemp("folder")
    images = root / "in"
    first, second, third = _qata_images(3)
    _link(first, images / first.name)
    _link(second, images / "sub" / second.name)
    _link(third, images / third.name)
    sitk.WriteImage(sitk.ReadImage(str(CT_EXAMPLES / "ct.nii.gz"))[:, :, 13:17], str(images / "ct.nii.gz"))
    for path in sorted((CT_EXAMPLES / "ct-dicom").iterdir())[8:12]:  # four neighbouring slices
        _link(path, images / "series" / "ct-dicom" / path.name)
    (images / "broken.png").write_bytes(b"not an image")
    kvasir = sorted((dataset("kvasir-seg") / "images").glob("*.jpg"))[0].read_bytes()
    (images / "sub" / "cut.jpg").write_bytes(kvasir[:len(kvasir) // 2])
    (images / "notes.txt").write_text("not an input")
    done = lgseg("segment", images, "--output", root / "out", "--model", "qata-cxr", "--workers", 1, cwd=root)
    return images, root / "out", done


def test_folder_mirrors_paths_and_bad_inputs_become_error_rows(folder_run):
    images, out, done = folder_run
    assert done.returncode == 3, done.stderr  # some inputs failed; the rest were segmented
    assert "Traceback" not in done.stderr
    rows = _rows(out)
    assert list(rows[0]) == COLUMNS  # no report column without --save-reports
    by_image = {row["image"]: row for row in rows}
    x_rays = [p.relative_to(images).as_posix() for p in images.rglob("*.png") if p.name != "broken.png"]
    assert set(by_image) == {*x_rays, "broken.png", "sub/cut.jpg", "ct.nii.gz", "series/ct-dicom"}  # no notes.txt
    for name in x_rays:
        row = by_image[name]
        assert row["error"] == "" and row["output"] == name and row["model"] == "qata-cxr"
        assert row["report_source"] == "prototype" and row["in_domain"] == "true" and row["volume_ml"] == ""
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / name)))
        assert mask.shape == (224, 224) and set(np.unique(mask)) <= {0, 255}
        assert abs((mask > 0).mean() - float(row["foreground_fraction"])) < 1e-5
    for name, words in (("broken.png", "cannot read"), ("sub/cut.jpg", "incomplete")):
        assert words in by_image[name]["error"] and "\n" not in by_image[name]["error"]
        assert by_image[name]["output"] == ""
        assert f"error: {name}: " in done.stderr
    assert not (out / "broken.png").exists() and not (out / "sub" / "cut.png").exists()
    assert "2 input(s) failed" in done.stderr.splitlines()[-1]
    assert _leftovers(out) == []


def test_volumes_keep_their_geometry(folder_run):
    images, out, _ = folder_run
    rows = {row["image"]: row for row in _rows(out)}
    for name, output in (("ct.nii.gz", "ct.nii.gz"), ("series/ct-dicom", "series/ct-dicom.nii.gz")):
        row = rows[name]
        assert row["error"] == "" and row["output"] == output  # volumes: NIfTI by default
        source = images / name
        if source.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(source)))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(source))
        mask = sitk.ReadImage(str(out / output))
        assert mask.GetSize() == image.GetSize()
        np.testing.assert_allclose(mask.GetSpacing(), image.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-6)
        voxels = int((sitk.GetArrayFromImage(mask) != 0).sum())
        assert float(row["volume_ml"]) == pytest.approx(voxels * float(np.prod(image.GetSpacing())) / 1000.0,
                                                        abs=1e-3)
        assert float(row["foreground_fraction"]) == pytest.approx(voxels / np.prod(image.GetSize()), abs=1e-5)


def test_a_rerun_with_other_settings_is_refused_and_single_image_options_too(folder_run, tmp_path):
    images, out, _ = folder_run
    before = (out / "results.csv").read_bytes()
    for args, words in ((["--threshold", 0.3], "another threshold"),
                        (["--report", QATA_REPORT], "--report is for a single image")):
        done = lgseg("segment", images, "--output", out, "--model", "qata-cxr", *args, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and words in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert (out / "results.csv").read_bytes() == before
    pixels = {p: p.read_bytes() for p in images.rglob("*.png")}
    onto = lgseg("segment", images, "--output", images, "--model", "qata-cxr", cwd=tmp_path)
    assert onto.returncode == 2 and "is the input folder" in onto.stderr
    assert {p: p.read_bytes() for p in images.rglob("*.png")} == pixels and not (images / "results.csv").exists()
    typo = lgseg("segment", images, "--output", tmp_path / "c", "--model", "qata-cxr", "--cluster", "loacl",
                 "--quiet", cwd=tmp_path)
    assert typo.returncode == 2 and len(typo.stderr.strip().splitlines()) == 1
    assert typo.stderr.startswith("error: 'loacl' is not a Dask scheduler address")
    single = lgseg("segment", next(images.glob("*.png")), "--output", tmp_path / "m.png", "--workers", 2, cwd=tmp_path)
    assert single.returncode == 2 and "--workers is for a folder or manifest input" in single.stderr
    assert not (tmp_path / "m.png").exists()


def test_csv_manifest_reports_outputs_and_save_reports(tmp_path):
    first, second = _qata_images(2)
    _link(first, tmp_path / "data" / "a.png")
    ct = CT_EXAMPLES / "ct.nii.gz"
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "report", "output"])
        writer.writerow(["data/a.png", QATA_REPORT, "masks/a.seg.nrrd"])  # relative to the manifest's folder
        writer.writerow([second, "", ""])  # elsewhere: mirrored from the folder of such images
        writer.writerow(["data/missing.png", "", ""])
        writer.writerow([ct, "", "ct.png"])  # a volume cannot be a PNG
        writer.writerow(["out/b.png", "", "b.png"])  # the mask would overwrite its image
    _link(second, tmp_path / "out" / "b.png")
    done = lgseg("segment", manifest, "--output", tmp_path / "out", "--model", "qata-cxr", "--workers", 1,
                 "--sides", "image", "--format", "nrrd", "--save-reports", "--json", cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["inputs"], summary["done"], summary["failed"], summary["skipped"]) == (5, 2, 3, 0)
    results = _rows(tmp_path / "out")
    assert list(results[0]) == COLUMNS[:4] + ["report"] + COLUMNS[4:]
    given, elsewhere, missing, volume, onto = results
    assert [row["image"] for row in results] == ["data/a.png", str(second), "data/missing.png", str(ct),
                                                 "out/b.png"]
    assert "would overwrite the image" in onto["error"] and (tmp_path / "out" / "b.png").is_symlink()
    assert given["output"] == "masks/a.seg.nrrd" and given["report_source"] == "given"
    assert given["report"] == QATA_REPORT  # --save-reports: the report used, given or approximated
    assert read_mask(tmp_path / "out" / "masks" / "a.seg.nrrd").shape == (1, 224, 224)
    assert elsewhere["output"] == second.with_suffix(".nrrd").name  # --format, where the row names no output
    assert read_mask(tmp_path / "out" / elsewhere["output"]).shape == (224, 224)
    assert elsewhere["report_source"] == "prototype" and "infection" in elsewhere["report"]
    assert "does not exist" in missing["error"]
    assert "as PNG" in volume["error"] and not (tmp_path / "out" / "ct.png").exists()


def test_jsonl_manifest_chooses_models_and_keeps_reports_out_of_the_results(tmp_path):
    first = _qata_images(1)[0]
    polyp = sorted((dataset("kvasir-seg") / "images").glob("*.jpg"))[1]
    rows = [{"image": str(first), "report": QATA_REPORT},
            {"image": str(polyp), "report": None, "output": "polyp.nrrd"},
            {"image": str(first), "report": "", "model": "qata-cxr", "output": "again/first.png"}]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n", encoding="utf-8")
    done = lgseg("segment", manifest, "--output", tmp_path / "out", "--workers", 1, "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = _rows(tmp_path / "out")
    assert list(results[0]) == COLUMNS
    assert [(row["model"], row["report_source"]) for row in results] == [
        ("qata-cxr", "given"), ("kvasir-polyp", "prototype"), ("qata-cxr", "prototype")]  # --model auto per image
    assert [row["output"] for row in results] == [first.name, "polyp.nrrd", "again/first.png"]
    text = (tmp_path / "out" / "results.csv").read_text(encoding="utf-8")
    assert QATA_REPORT not in text and "infection" not in text and "located" not in text  # no report at all


def test_ctrl_c_stops_after_the_current_image_twice_at_once_and_a_rerun_continues(tmp_path):
    images = tmp_path / "in"
    count = 16  # enough that the command cannot finish them all between the first mask and the signal
    for path in _qata_images(count):
        _link(path, images / path.name)
    out = tmp_path / "out"

    def interrupted(times: int) -> tuple[int, str]:
        """Run the batch, press Ctrl+C ``times`` times once it has written a new mask; its exit code and stderr."""
        command, env = _command("segment", images, "--output", out, "--workers", 1, "--model", "qata-cxr")
        before = len(list(out.glob("*.png")))
        # A session of its own, so that Ctrl+C can be sent as a terminal sends it: to every process of the command.
        # Ctrl+C as in a terminal's foreground job: where the tests themselves run in the background (a CI job
        # started with '&'), SIGINT is inherited as ignored, and the batch rightly keeps ignoring it.
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 120
            while len(list(out.glob("*.png"))) <= before and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.02)
            for _ in range(times):
                os.killpg(process.pid, signal.SIGINT)
                time.sleep(0.05)
            _, stderr = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
        return process.returncode, stderr

    # Once: the images being segmented are finished, each mask has its row. Twice: it stops at once (an image
    # finishing at that moment may have its mask but no row yet: the rerun segments it again).
    for times, words, unrecorded in ((1, "run the same command again", 0), (2, "interrupted", 1)):
        code, stderr = interrupted(times)
        assert code == 130 and "Traceback" not in stderr and words in stderr, stderr
        rows = _rows(out)
        masks = sorted(p.name for p in out.glob("*.png"))
        recorded = sorted(row["output"] for row in rows)
        assert 1 <= len(rows) < count and set(recorded) <= set(masks) and len(masks) - len(rows) <= unrecorded
        assert all(row["error"] == "" for row in rows) and _leftovers(out) == []
    written = {name: (out / name).stat().st_mtime_ns for name in recorded}

    again = lgseg("segment", images, "--output", out, "--workers", 1, "--model", "qata-cxr", "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["skipped"], summary["done"], summary["failed"]) == (len(recorded), count - len(recorded), 0)
    assert {name: (out / name).stat().st_mtime_ns for name in recorded} == written  # nothing redone
    rows = _rows(out)
    assert [row["image"] for row in rows] == sorted(p.name for p in images.iterdir())
    assert all(row["error"] == "" and (out / row["output"]).is_file() for row in rows)


def test_a_local_dask_cluster_gives_the_same_outputs(folder_run, tmp_path):
    """--cluster local, two workers (the [cluster] extra, which the tests install): the same rows and masks."""
    images, reference, _ = folder_run
    done = lgseg("segment", images, "--output", tmp_path / "out", "--model", "qata-cxr", "--cluster", "local",
                 "--workers", 2, "--quiet", cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    rows, expected = _rows(tmp_path / "out"), _rows(reference)
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in rows] == \
        [{k: v for k, v in row.items() if k != "seconds"} for row in expected]
    for row in rows:
        if row["output"]:
            assert (tmp_path / "out" / row["output"]).read_bytes() == (reference / row["output"]).read_bytes()
    assert _leftovers(tmp_path / "out") == []
