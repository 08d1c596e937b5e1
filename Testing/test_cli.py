"""The ``lgseg`` command line end to end: real images, a real (small) model package, every kind of bad input.

Most runs start the tool in a subprocess, as a user does (``python -m languageguidedseg.cli``), so a traceback or a
stray line on stderr cannot hide. Variants that only differ in their options call ``main()`` in this process, which
saves the seconds each new process spends importing torch and MONAI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import languageguidedseg
from conftest import QATA_REPORT
from languageguidedseg.cli import main
from languageguidedseg.imageio import read_mask
from languageguidedseg.package import CONFIG_FILE, WEIGHTS_FILE

# The folder that holds the package under test: the checkout's Logic/ or the environment's site-packages.
PACKAGE_PARENT = Path(languageguidedseg.__file__).resolve().parents[1]
SUMMARY_KEYS = {"report", "report_source", "seconds", "foreground_fraction", "output", "model", "device", "similarity",
                "sides", "orientation"}


@pytest.fixture
def models_folder(tmp_path, monkeypatch) -> Path:
    """An empty user models folder, for this process and the subprocesses alike."""
    folder = tmp_path / "user-models"
    folder.mkdir()
    monkeypatch.setenv("LGSEG_MODELS", str(folder))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # keeps the Segmenter at the thread count set above
    return folder


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def qata_image(qata) -> tuple[Path, str]:
    """The first validation image of QaTa-COV19 and its report."""
    sample_id = json.loads((qata / "split.json").read_text())["val"][0]
    return qata / "images" / f"{sample_id}.png", (qata / "reports" / f"{sample_id}.txt").read_text().strip()


def lgseg(*args: object, cwd: Path, stdin: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run the tool in a new process with this process's environment (LGSEG_MODELS as the test set it)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("LGSEG_DEBUG", None)
    if PACKAGE_PARENT.name not in ("site-packages", "dist-packages"):  # testing the checkout, not an installation
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "languageguidedseg.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, input=stdin)


def run_main(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _volume(path: Path, values: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetOrigin((-10.0, 20.0, 5.0))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    return image


def _random_volume(path: Path, shape=(6, 40, 48)) -> sitk.Image:
    return _volume(path, np.random.default_rng(0).integers(-1000, 1000, shape).astype(np.int16))


def _png_size(path: Path) -> tuple[int, ...]:
    return sitk.ReadImage(str(path)).GetSize()


# ---------------------------------------------------------------- end to end (subprocess)


def test_segment_qata_image_with_report(qata_image, tiny_model, models_folder, out, capsys):
    image, report = qata_image
    result = lgseg("segment", image, "--report", report, "--model", tiny_model, "--output", out / "mask.png",
                   "--json", cwd=out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "warning" not in result.stderr
    summary = json.loads(result.stdout)  # stdout is exactly one JSON object
    assert SUMMARY_KEYS <= set(summary)
    assert summary["report"] == report and summary["report_source"] == "given" and summary["similarity"] is None
    assert summary["model"] == "tiny" and summary["device"] == "cpu" and summary["seconds"] > 0
    assert Path(summary["output"]) == out / "mask.png"
    assert _png_size(out / "mask.png") == _png_size(image) == (224, 224)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mask.png")))
    assert set(np.unique(mask)) <= {0, 255}
    assert summary["foreground_fraction"] == pytest.approx((mask > 0).mean(), abs=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["mask.png"]  # no temporary file left

    # Without --json: one line on stdout that does not echo the report (it may identify a patient).
    code, stdout, _ = run_main(capsys, "segment", image, "--report", report, "--model", tiny_model, "--output",
                               out / "mask2.png")
    assert code == 0 and stdout.count("\n") == 1 and report not in stdout
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mask2.png"))), mask)


def test_segment_volume_shows_progress(tiny_model, models_folder, out, tmp_path, capsys):
    reference = _random_volume(tmp_path / "volume.nrrd", shape=(9, 40, 48))
    result = lgseg("segment", tmp_path / "volume.nrrd", "--model", tiny_model, "--output", out / "mask.seg.nrrd",
                   "--json", cwd=out)
    assert result.returncode == 0, result.stderr
    assert "segmenting" in result.stderr and "/9" in result.stderr  # tqdm's progress bar, on stderr only
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert summary["report_source"] == "prototype" and summary["report"].startswith("prototype report")
    mask = read_mask(out / "mask.seg.nrrd")
    assert mask.shape == (9, 40, 48)
    assert summary["foreground_fraction"] == pytest.approx(mask.mean(), abs=1e-6)
    # --quiet: no progress bar.
    code, _, stderr = run_main(capsys, "segment", tmp_path / "volume.nrrd", "--model", tiny_model, "--output",
                               out / "mask.nrrd", "--quiet")
    assert code == 0 and stderr == ""
    np.testing.assert_array_equal(read_mask(out / "mask.nrrd"), mask)
    written = sitk.ReadImage(str(out / "mask.nrrd"))
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing())
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection())


def test_segment_without_model_says_none_is_installed(qata_image, no_models_installed, out, capsys):
    code, stdout, stderr = run_main(capsys, "segment", qata_image[0], "--output", out / "mask.png")
    assert code == 2 and stdout == "" and list(out.iterdir()) == []
    assert stderr.startswith("error: no model is installed") and stderr.count("\n") == 1 and "--model" in stderr


# ---------------------------------------------------------------- bad input (subprocess)


def _assert_one_error(result: subprocess.CompletedProcess, out: Path) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert list(out.iterdir()) == []  # no output and no temporary file left behind
    return lines[0]


def _changed_model(tiny_model: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    if how == "weights byte":
        data = bytearray((folder / WEIGHTS_FILE).read_bytes())
        data[len(data) // 3] ^= 0x10
        (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    elif how == "json byte":
        text = (folder / CONFIG_FILE).read_text(encoding="utf-8")
        (folder / CONFIG_FILE).write_text(text.replace('"threshold": 0.5', '"threshold": 0.1'), encoding="utf-8")
    elif how == "missing weights":
        (folder / WEIGHTS_FILE).unlink()
    elif how == "missing json":
        (folder / CONFIG_FILE).unlink()
    return folder


def _bad_case(case: str, tmp_path: Path, out: Path, tiny_model: Path, image: Path) -> tuple[list, str]:
    """Arguments for one bad input and a word the error line must contain."""
    output = out / "mask.png"
    if case == "missing image":
        return ["segment", tmp_path / "nothing.png", "--model", tiny_model, "--output", output], "does not exist"
    if case == "truncated image":
        (tmp_path / "cut.png").write_bytes(image.read_bytes()[:300])
        return ["segment", tmp_path / "cut.png", "--model", tiny_model, "--output", output], "cannot read"
    if case == "not an image":
        (tmp_path / "notes.png").write_text("not an image\n")
        return ["segment", tmp_path / "notes.png", "--model", tiny_model, "--output", output], "cannot read"
    if case == "4D image":
        volumes = [sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)) for _ in range(2)]
        sitk.WriteImage(sitk.JoinSeries(volumes), str(tmp_path / "four.nrrd"))
        return ["segment", tmp_path / "four.nrrd", "--model", tiny_model, "--output", out / "m.nrrd"], "4D"
    if case == "zero-size image":
        (tmp_path / "empty.mha").write_text("ObjectType = Image\nNDims = 2\nDimSize = 0 5\n"
                                            "ElementType = MET_UCHAR\nElementDataFile = LOCAL\n")
        return ["segment", tmp_path / "empty.mha", "--model", tiny_model, "--output", output], "empty"
    if case == "output folder missing":
        return ["segment", image, "--model", tiny_model, "--output", out / "no" / "mask.png"], "does not exist"
    if case == "output is a folder":
        (tmp_path / "taken.png").mkdir()
        return ["segment", image, "--model", tiny_model, "--output", tmp_path / "taken.png"], "folder"
    if case == "output under a file":
        # The error of a folder that cannot be written, for any user (root writes to read-only folders).
        (tmp_path / "notes.txt").write_text("a file, not a folder\n")
        output = tmp_path / "notes.txt" / "mask.png"
        return ["segment", image, "--model", tiny_model, "--output", output], "not a folder"
    if case == "unknown output type":
        return ["segment", image, "--model", tiny_model, "--output", out / "mask.jpg"], "unknown file type"
    if case == "3D mask as PNG":
        _random_volume(tmp_path / "volume.nrrd")
        return ["segment", tmp_path / "volume.nrrd", "--model", tiny_model, "--output", output], "PNG"
    if case == "missing report file":
        return ["segment", image, "--model", tiny_model, "--report-file", tmp_path / "none.txt", "--output",
                output], "report file"
    if case == "report file is a folder":
        return ["segment", image, "--model", tiny_model, "--report-file", tmp_path, "--output", output], "folder"
    if case == "top-k below 1":
        return ["approximate", image, "--model", tiny_model, "--top-k", "0"], "at least 1"
    if case == "no output option":
        return ["segment", image, "--model", tiny_model], "--output"
    if case.startswith("model "):
        model = _changed_model(tiny_model, tmp_path, case[len("model "):])
        word = {"model weights byte": "changed or damaged", "model json byte": "changed",
                "model missing weights": "missing", "model missing json": "missing"}[case]
        return ["segment", image, "--model", model, "--output", output], word
    if case == "unknown model name":
        return ["segment", image, "--model", "no-such-model", "--output", output], "unknown model"
    raise AssertionError(case)


BAD_CASES = ["missing image", "truncated image", "not an image", "4D image", "zero-size image",
             "output folder missing", "output is a folder", "output under a file", "unknown output type",
             "3D mask as PNG", "missing report file", "report file is a folder", "top-k below 1",
             "no output option", "model weights byte", "model json byte",
             "model missing weights", "model missing json", "unknown model name"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gives_one_error_line(case, qata_image, tiny_model, models_folder, out, tmp_path):
    args, word = _bad_case(case, tmp_path, out, tiny_model, qata_image[0])
    result = lgseg(*args, cwd=tmp_path)
    line = _assert_one_error(result, out)
    assert word in line, line


# ---------------------------------------------------------------- options (in process)


def test_prototype_guidance_without_report(qata_image, tiny_model, models_folder, out, capsys):
    code, stdout, stderr = run_main(capsys, "approximate", qata_image[0], "--model", tiny_model, "--json")
    assert code == 0, stderr
    approximation = json.loads(stdout)
    for extra in ([], ["--report", "  \n "]):  # no report, or a whitespace one: the prototype bank guides
        code, stdout, stderr = run_main(capsys, "segment", qata_image[0], "--model", tiny_model, "--output",
                                        out / "mask.png", "--json", *extra)
        assert code == 0, stderr
        summary = json.loads(stdout)
        assert summary["report_source"] == "prototype"
        # The approximated report is the image's nearest prototype, the one 'lgseg approximate' names.
        assert summary["report"] == approximation["report"]
        assert summary["similarity"] == pytest.approx(approximation["similarity"], abs=1e-4)


def test_report_file(qata_image, tiny_model, models_folder, out, tmp_path, capsys):
    (tmp_path / "report.txt").write_text(f"\n  {QATA_REPORT}\n", encoding="utf-8")
    code, stdout, stderr = run_main(capsys, "segment", qata_image[0], "--model", tiny_model, "--report-file",
                                    tmp_path / "report.txt", "--output", out / "a.png", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["report"] == QATA_REPORT and json.loads(stdout)["report_source"] == "given"
    code, stdout, _ = run_main(capsys, "segment", qata_image[0], "--model", tiny_model, "--report", QATA_REPORT,
                               "--output", out / "b.png", "--json")
    assert code == 0
    assert (out / "a.png").read_bytes() == (out / "b.png").read_bytes()
    code, _, stderr = run_main(capsys, "segment", qata_image[0], "--model", tiny_model, "--report", "x",
                               "--report-file", tmp_path / "report.txt", "--output", out / "c.png")
    assert code == 2 and stderr.startswith("error:") and "not both" in stderr


def test_report_from_a_pipe(qata_image, tiny_model, models_folder, out, tmp_path):
    """--report-file /dev/stdin: the report is piped in, never on the command line or in the shell's history."""
    result = lgseg("segment", qata_image[0], "--model", tiny_model, "--report-file", "/dev/stdin", "--output",
                   out / "a.png", "--json", cwd=tmp_path, stdin=QATA_REPORT + "\n")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["report"] == QATA_REPORT and summary["report_source"] == "given"


def test_segmentation_output_for_slicer(qata_image, tiny_model, models_folder, out, capsys):
    import slicerio

    code, stdout, stderr = run_main(capsys, "segment", qata_image[0], "--model", tiny_model, "--report",
                                    QATA_REPORT, "--output", out / "mask.seg.nrrd", "--json")
    assert code == 0, stderr
    segmentation = slicerio.read_segmentation(str(out / "mask.seg.nrrd"))
    segment = segmentation["segments"][0]
    assert segment["name"] == "Infection"
    np.testing.assert_allclose(segment["color"], (0.9, 0.2, 0.1))
    mask = read_mask(out / "mask.seg.nrrd")
    assert mask.shape == (1, 224, 224)
    assert json.loads(stdout)["foreground_fraction"] == pytest.approx(mask.mean(), abs=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_option_fills_only_that_slice(tiny_model, models_folder, out, tmp_path, capsys, axis):
    reference = _random_volume(tmp_path / "volume.nrrd")
    k = 2
    code, stdout, stderr = run_main(capsys, "segment", tmp_path / "volume.nrrd", "--model", tiny_model,
                                    "--report", QATA_REPORT, "--slice", k, "--axis", axis, "--output",
                                    out / "mask.nii.gz", "--json", "--sides", "image")
    assert code == 0, stderr
    written = sitk.ReadImage(str(out / "mask.nii.gz"))
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    mask = sitk.GetArrayFromImage(written)  # (z, y, x): IJK axis a is numpy axis 2 - a
    inside = np.take(mask, k, axis=2 - axis)
    outside = np.delete(mask, k, axis=2 - axis)
    assert inside.any() and not outside.any()
    assert json.loads(stdout)["foreground_fraction"] == pytest.approx(mask.mean(), abs=1e-6)

    # The slice is segmented as the same 2D image would be (with the report in image sides: the 2D copy has lost
    # the volume's orientation, so patient sides could translate differently).
    plane = np.take(sitk.GetArrayFromImage(reference), k, axis=2 - axis)
    sitk.WriteImage(sitk.GetImageFromArray(plane), str(tmp_path / "plane.nrrd"))
    code, _, _ = run_main(capsys, "segment", tmp_path / "plane.nrrd", "--model", tiny_model, "--report",
                          QATA_REPORT, "--output", out / "plane.nrrd", "--sides", "image")
    assert code == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "plane.nrrd"))), inside)


@pytest.mark.parametrize("kind", ["nan", "all nan", "constant", "inf"])
def test_nan_and_constant_images_do_not_crash(kind, tiny_model, models_folder, out, tmp_path, capsys):
    values = np.random.default_rng(0).normal(size=(48, 64)).astype(np.float32)
    if kind == "nan":
        values[::3] = np.nan
    elif kind == "all nan":
        values[:] = np.nan
    elif kind == "constant":
        values[:] = 7.0
    else:
        values[5:9] = np.inf
    _volume(tmp_path / "image.nrrd", values[None])
    code, stdout, stderr = run_main(capsys, "segment", tmp_path / "image.nrrd", "--model", tiny_model,
                                    "--output", out / "mask.nrrd", "--json")
    assert code == 0, stderr
    assert "error" not in stderr
    mask = read_mask(out / "mask.nrrd")
    assert mask.shape == (1, 48, 64)
    assert json.loads(stdout)["foreground_fraction"] == pytest.approx(mask.mean(), abs=1e-6)
    if kind in ("all nan", "constant"):  # nothing to see: segmented like a blank image
        _volume(tmp_path / "blank.nrrd", np.zeros((1, 48, 64), np.float32))
        assert run_main(capsys, "segment", tmp_path / "blank.nrrd", "--model", tiny_model, "--output",
                        out / "blank.nrrd")[0] == 0
        np.testing.assert_array_equal(mask, read_mask(out / "blank.nrrd"))


def test_long_report_warns_in_one_line(qata_image, tiny_model, models_folder, out, capsys):
    code, stdout, stderr = run_main(capsys, "segment", qata_image[0], "--model", tiny_model, "--report",
                                    " ".join([QATA_REPORT] * 5), "--output", out / "mask.png", "--json")
    assert code == 0
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "truncated" in lines[0]
    assert QATA_REPORT not in stderr
    assert json.loads(stdout)["report_source"] == "given"


@pytest.mark.parametrize("args, word", [
    (["--threshold", "1.5"], "threshold"),
    (["--threshold", "nan"], "threshold"),
    (["--slice", "1"], "outside the image"),
    (["--axis", "1"], "--slice"),
])
def test_bad_options(qata_image, tiny_model, models_folder, out, capsys, args, word):
    code, stdout, stderr = run_main(capsys, "segment", qata_image[0], "--model", tiny_model, "--output",
                                    out / "mask.png", *args)
    assert code == 2 and stdout == "" and stderr.startswith("error:") and stderr.count("\n") == 1
    assert word in stderr and list(out.iterdir()) == []


def test_cuda_without_gpu(qata_image, tiny_model, models_folder, out, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available")
    code, _, stderr = run_main(capsys, "segment", qata_image[0], "--model", tiny_model, "--device", "cuda",
                               "--output", out / "mask.png")
    assert code == 2 and "CUDA" in stderr and list(out.iterdir()) == []
    assert stderr.rstrip().endswith("(--device)")  # the engine's message names the setting; the CLI its flag


def test_approximate(qata_image, tiny_model, models_folder, capsys):
    code, stdout, stderr = run_main(capsys, "approximate", qata_image[0], "--model", tiny_model, "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["report"].startswith("prototype report") and len(result["top"]) == 3
    assert result["top"][0]["report"] == result["report"]
    assert result["sides"] == "patient" and result["orientation"] == "assumed: radiological display"
    code, stdout, stderr = run_main(capsys, "approximate", qata_image[0], "--model", tiny_model, "--sides", "image")
    assert code == 0 and stdout.splitlines()[0] == "Left/right: image (as displayed)"


def test_segment_says_which_sides_and_whether_the_orientation_was_assumed(qata_image, tiny_model, models_folder, out,
                                                                         tmp_path, capsys):
    code, stdout, _ = run_main(capsys, "segment", qata_image[0], "--model", tiny_model, "--output", out / "mask.png")
    assert code == 0 and stdout.strip().endswith("Left/right: patient (assumed: radiological display)")
    _random_volume(tmp_path / "volume.nrrd")
    code, stdout, _ = run_main(capsys, "segment", tmp_path / "volume.nrrd", "--model", tiny_model, "--output",
                               out / "mask.nrrd", "--json", "--quiet")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["sides"] == "patient" and summary["orientation"] == "from the file"
    with pytest.raises(SystemExit) as info:
        main(["segment", str(qata_image[0]), "--output", str(out / "mask.png"), "--sides", "left"])
    assert info.value.code == 2 and "--sides" in capsys.readouterr().err


def test_engine_errors_name_no_flag_and_the_command_line_adds_its_own(qata_image, tiny_model, models_folder,
                                                                     no_models_installed, out, capsys):
    """Engine messages also reach Slicer and the web page, which have no flags: the command line adds its flag for
    the setting an error concerns, and only where that command has the flag."""
    from argparse import Namespace

    from languageguidedseg.errors import LgsegError
    from languageguidedseg.inference import slices_of
    from languageguidedseg.options import error_line
    from languageguidedseg.package import find_model

    for raise_error, option in ((lambda: find_model("no-such-model"), "model"), (lambda: find_model(), "model"),
                                (lambda: find_model(out / "none"), "model"),
                                (lambda: slices_of(np.zeros((2, 3, 4)), False, 3), "axis")):
        with pytest.raises(LgsegError) as info:
            raise_error()
        assert info.value.option == option and "--" not in str(info.value) and "lgseg" not in str(info.value)
    error = LgsegError("no slice 9\nhere", option="slice")
    assert error_line(error, Namespace(slice=9)) == "error: no slice 9 here (--slice)"
    assert error_line(error, Namespace(model=None)) == "error: no slice 9 here"
    assert error_line(LgsegError("low", option="text_ratio"), Namespace(text_ratio=0.0)) == "error: low (--text-ratio)"

    code, _, stderr = run_main(capsys, "segment", qata_image[0], "--model", tiny_model, "--slice", "1", "--output",
                               out / "mask.png")
    assert code == 2 and stderr.startswith("error: slice 1 is outside the image") and stderr.endswith("(--slice)\n")


def test_shared_options_have_their_own_defaults():
    from languageguidedseg.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["segment", "x.png", "-o", "m.png"]).device == "auto"
    assert parser.parse_args(["evaluate", "data"]).device == "auto"
    assert parser.parse_args(["benchmark"]).device == "cpu"  # the CPU figures unless asked otherwise
    assert parser.parse_args(["models", "--json"]).json


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and languageguidedseg.__version__ in capsys.readouterr().out
