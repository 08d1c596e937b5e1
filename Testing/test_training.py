"""Training/ end to end on a few dozen real images: single process, torchrun, exact resume, the bank."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "Training" / "configs" / "qata-cxr.yaml"
TINY = ["--limit", "16", "--batch-size", "4", "--epochs", "2", "--no-progress"]


def _env() -> dict[str, str]:
    # PYTHONFAULTHANDLER: a run that hangs prints every thread's stack when the test stops it (see _train).
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    if importlib.util.find_spec("languageguidedseg") is None:  # a source checkout that is not installed
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "Logic"), env.get("PYTHONPATH")]))
    return env


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (torchrun's workers), from /proc where there is one."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _train(output: Path, *extra: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [sys.executable, *launcher, str(REPO / "Training" / "train.py"), "--config", str(CONFIG),
               "--output", str(output), *TINY, *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        # Stop the launcher and every worker with SIGABRT so that the fault handler shows where each one hung.
        for pid in [*_children(process.pid), process.pid]:
            os.kill(pid, signal.SIGABRT)
        stdout, stderr = process.communicate()
        pytest.fail(f"training did not finish in 600 s; the end of its output:\n{stderr[-6000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_data_set_without_report_sides_is_refused(qata, tmp_path):
    """A data set must say what left and right mean in its reports: the model package declares it."""
    data = tmp_path / "data"
    for name in ("images", "masks", "reports", "split.json"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).symlink_to(qata / name)
    output = tmp_path / "model"
    result = subprocess.run([sys.executable, str(REPO / "Training" / "train.py"), "--config", str(CONFIG), "--data",
                             str(data), "--output", str(output), *TINY], capture_output=True, text=True, env=_env(),
                            timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error:") and "dataset.json" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not output.exists()


@pytest.fixture(scope="module")
def trained(qata, tmp_path_factory) -> Path:
    """An uninterrupted two-epoch run (the first epoch is the bank warm-up)."""
    output = tmp_path_factory.mktemp("full") / "model"
    _train(output)
    return output


def test_single_process_run_writes_a_verified_package_with_bank_and_logs(trained, qata):
    from languageguidedseg.data import load_split
    from languageguidedseg.package import load_package

    package = load_package(trained)
    config = package.config
    assert config.network.bank_size > 0
    # ProLearn's design: prototypes keep token features, refined per stage by the guided approximation blocks.
    assert config.network.bank_tokens > 0 and config.network.guided_approximation
    assert len(config.prototype_reports) == config.network.bank_size
    # Each prototype stands for real training reports: its report is one of them, not an invented text.
    train_reports = {sample.report for sample in load_split(qata, "train", validate=False)}
    assert set(config.prototype_reports) <= train_reports
    # The model's recorded scores are those of the epoch it was exported from, as the training log has them.
    with open(trained.parent / "model-training" / "log.csv", newline="") as handle:
        logged = next(row for row in csv.DictReader(handle) if int(row["epoch"]) == config.training["epoch"])
    assert config.report_sides == "image"  # from the data set's dataset.json
    for mode in ("report", "prototype"):
        assert config.metrics[f"val_{mode}_dice"] == pytest.approx(float(logged[f"val_{mode}_dice"]), abs=1e-4)
    assert config.training["command"].startswith("python ") and "--limit 16" in config.training["command"]
    assert "QaTa-COV19" in config.training["data_citation"]
    # The finished run describes its training images (16 here, --limit) for the applicability check.
    domain = package.domain()
    assert domain is not None and domain.config.images == "a frontal chest X-ray"
    assert domain.config.train_images == 16 and domain.config.val_in_domain_rate >= 0.99
    run = trained.parent / "model-training"
    for name in ("checkpoint.pt", "log.csv", "curves.png", "val_cases.png"):
        assert (run / name).stat().st_size > 0, name
    assert len((run / "log.csv").read_text().splitlines()) == 3  # header + 2 epochs


def test_resume_after_a_stop_gives_the_same_weights(trained, tmp_path):
    output = tmp_path / "model"
    _train(output, "--stop-after", "1")
    assert not (output / "model.safetensors").exists()  # no bank yet after the warm-up epoch: no package
    checkpoint = output.parent / "model-training" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    del state["config"]["package"]["no_report_flips"]  # as written before that key existed (its default, as here)
    torch.save(state, checkpoint)
    resumed = _train(output, "--resume")
    assert "resuming" in resumed.stderr
    a, b = load_file(str(trained / "model.safetensors")), load_file(str(output / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_refuses_changed_settings(trained, tmp_path):
    output = tmp_path / "model"
    _train(output, "--stop-after", "1")
    command = [sys.executable, str(REPO / "Training" / "train.py"), "--config", str(CONFIG), "--output", str(output),
               *TINY, "--resume", "--text-ratio", "0.5"]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --resume needs the same settings")
    assert "Traceback" not in result.stderr


def test_a_new_run_never_overwrites_a_package_or_a_checkpoint(trained, tmp_path):
    """Without --resume, a run into the folder of a finished one (or of an interrupted one) stops at once in one
    line and changes nothing; nonsense epochs are refused the same way."""
    weights = (trained / "model.safetensors").read_bytes()
    interrupted = tmp_path / "model"
    _train(interrupted, "--stop-after", "1")
    for output, extra, message in ((trained, (), "already holds a model package"),
                                   (interrupted, (), "continue it with --resume"),
                                   (tmp_path / "other", ("--epochs", "0"), "epochs")):
        command = [sys.executable, str(REPO / "Training" / "train.py"), "--config", str(CONFIG), "--output",
                   str(output), *TINY, *extra]
        result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
        assert result.returncode == 2 and result.stderr.startswith("error:") and message in result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
    assert (trained / "model.safetensors").read_bytes() == weights
    assert not (tmp_path / "other").exists()


def test_torchrun_two_processes(qata, tmp_path):
    output = tmp_path / "model"
    result = _train(output, launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    config = json.loads((output / "model.json").read_text())["config"]
    assert config["training"]["world_size"] == 2
    assert config["training"]["command"].startswith("torchrun --nproc_per_node=2")
    assert config["network"]["bank_size"] > 0
    assert result.stderr.count("model package:") == 1  # only rank 0 writes


def test_limited_text_ratio_keeps_the_requested_share_of_reports(qata, tmp_path):
    output = tmp_path / "model"
    _train(output, "--text-ratio", "0.25")
    config = json.loads((output / "model.json").read_text())["config"]
    assert config["training"]["train_reports"] == 4  # 25% of 16
    assert config["network"]["bank_size"] >= 1


def test_fine_tuning_with_report_edits_keeps_the_bank_and_probes_steering(trained, tmp_path):
    """init_from starts from a package (weights, bank and its reports); report_edits trains on one side of the
    bilateral cases; validation measures the steering probe (QaTa's reports name the image's sides)."""
    import yaml

    from languageguidedseg.package import load_package

    config = yaml.safe_load(CONFIG.read_text())
    config["data"].update(path=str(REPO / config["data"]["path"]), report_edits=1.0)
    config.update(init_from=str(trained), bank={**config["bank"], "warmup_epochs": 0})
    fine_tune = tmp_path / "fine-tune.yaml"
    fine_tune.write_text(yaml.safe_dump(config))
    output = tmp_path / "model"
    command = [sys.executable, str(REPO / "Training" / "train.py"), "--config", str(fine_tune), "--output",
               str(output), *TINY[:-3], "--epochs", "1", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initialised from" in result.stderr
    edits = int(result.stderr.split(" with report edits")[0].rsplit(", ", 1)[1])
    assert edits > 0
    start, tuned = load_package(trained), load_package(output)
    assert tuned.config.prototype_reports == start.config.prototype_reports
    assert tuned.config.network.bank_size == start.config.network.bank_size
    assert -1.0 <= tuned.config.metrics["val_steering"] <= 1.0
    assert 0.0 <= tuned.config.metrics["val_laterality"] <= 1.0
    assert any(not torch.equal(start.state_dict[k], tuned.state_dict[k]) for k in start.state_dict)


DISTILLATION = ("--set", "bank.warmup_epochs=0", "--set", "optimisation.report_dropout=0.5")


@pytest.fixture(scope="module")
def distilled(trained, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """A fine-tune of ``trained`` whose no-report steps learn from two teachers (``trained`` twice), stopped after one
    epoch and resumed: the package, and the output of both calls."""
    output = tmp_path_factory.mktemp("distilled") / "model"
    args = ("--set", f"teachers=[{trained}, {trained}]", "--set", f"init_from={trained}", *DISTILLATION)
    first = _train(output, *args, "--stop-after", "1")
    return output, first, _train(output, *args, "--resume")


def test_distillation_trains_the_no_report_steps_on_the_teachers_probabilities(trained, distilled, tmp_path):
    """``teachers:`` makes the averaged no-report probabilities of model packages a soft target: computed once
    with the engine as ``lgseg`` segments without a report, kept with the run (--resume reads them), logged as a
    loss term; a teacher that is not a model package stops the run in one line before anything is written."""
    import numpy as np
    from torch.nn import functional as F

    from languageguidedseg.data import load_pair
    from languageguidedseg.inference import Segmenter
    from training.config import load_config
    from training.data import load_samples

    output, first, resumed = distilled
    assert "soft targets: 16 training images, the average of 2 teachers" in first.stderr
    targets = torch.load(output.parent / "model-training" / "soft_targets.pt", weights_only=True)["targets"]
    # The targets are the teacher's no-report probabilities on the training images, on the network's grid.
    config = load_config(CONFIG, {"data.limit": 16})
    train, _ = load_samples(config.data, config.seed)
    teacher = Segmenter.load(trained, device="cpu")
    for i in (0, 7):
        image, _ = load_pair(train[i])
        expected = F.interpolate(torch.from_numpy(teacher.predict_slices(image[None], None).probabilities)[None],
                                 size=targets.shape[-2:], mode="bilinear", antialias=True)[0]
        assert np.abs(targets[i].float().numpy() - expected.numpy()).max() < 2e-3
    assert "soft targets:" not in resumed.stderr  # read from the run folder
    with open(output.parent / "model-training" / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(float(row["train_distillation"]) > 0 for row in rows)
    package = json.loads((output / "model.json").read_text())["config"]
    assert package["training"]["config"]["teachers"] == [str(trained), str(trained)]

    bad = tmp_path / "bad" / "model"
    result = subprocess.run([sys.executable, str(REPO / "Training" / "train.py"), "--config", str(CONFIG), "--output",
                             str(bad), *TINY, "--set", f"teachers=[{tmp_path}]"], capture_output=True, text=True,
                            env=_env(), timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: distillation teacher '{tmp_path}' is not a model package folder")
    assert not bad.exists() and not bad.parent.joinpath("model-training", "checkpoint.pt").exists()


def test_interpolate_writes_the_weights_between_the_start_and_its_fine_tune(trained, distilled, tmp_path):
    """--interpolate (WiSE-FT): the package's weights are the start's and the fine-tune's mixed by the weight (the
    bank's image keys recomputed with the mixed encoder), validated and described; a package with another network or
    bank than init_from is refused in one line."""
    from languageguidedseg.package import load_package

    tuned = distilled[0]
    output = tmp_path / "mixed"
    result = _train(output, "--set", f"init_from={trained}", "--interpolate", str(tuned), "--interpolate-weight",
                    "0.25", *DISTILLATION)
    assert "interpolated: val_report_dice" in result.stderr
    start, fine, mixed = load_package(trained), load_package(tuned), load_package(output)
    for key, value in mixed.state_dict.items():
        if value.is_floating_point() and key != "bank.image_keys":
            expected = 0.75 * start.state_dict[key] + 0.25 * fine.state_dict[key]
            assert torch.allclose(value, expected, atol=2e-3, rtol=2e-3), key  # float16 packages
    assert mixed.config.prototype_reports == start.config.prototype_reports
    assert 0.0 <= mixed.config.metrics["val_prototype_dice"] <= 1.0 and mixed.domain() is not None
    assert "--interpolate" in mixed.config.training["command"]

    other = subprocess.run([sys.executable, str(REPO / "Training" / "train.py"), "--config", str(CONFIG), "--output",
                            str(tmp_path / "other"), *TINY, "--set", f"init_from={trained}", "--interpolate",
                            str(REPO / "Logic" / "languageguidedseg" / "models" / "kvasir-polyp")],
                           capture_output=True, text=True, env=_env(), timeout=300)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "has another network or prototype bank than init_from" in other.stderr
    assert not (tmp_path / "other").exists()

    alone = subprocess.run([sys.executable, str(REPO / "Training" / "train.py"), "--config", str(CONFIG), "--output",
                            str(tmp_path / "alone"), *TINY, "--interpolate-weight", "0.25"],
                           capture_output=True, text=True, env=_env(), timeout=300)
    assert alone.returncode == 2 and alone.stderr.strip() == (
        "error: --interpolate-weight needs --interpolate MODEL_DIR (the fine-tune to mix with init_from)")
    assert not (tmp_path / "alone").exists()


def test_bank_is_deterministic_for_a_seed():
    from languageguidedseg.prototypes import build_bank

    generator = torch.Generator().manual_seed(0)
    image, text = torch.randn(60, 16, generator=generator), torch.randn(60, 16, generator=generator)
    classes = [list(range(0, 30)), list(range(20, 60))]
    a = build_bank(image, text, classes, clusters_per_class=4, seed=3)
    b = build_bank(image, text, classes, clusters_per_class=4, seed=3)
    assert torch.equal(a.image_keys, b.image_keys) and torch.equal(a.text_values, b.text_values)
    assert a.members == b.members and a.representatives == b.representatives
    assert a.image_keys.shape == (8, 16) and a.classes.tolist() == [0] * 4 + [1] * 4
    # Each representative is one of its prototype's members.
    assert all(r in m for r, m in zip(a.representatives, a.members))


def test_token_bank_averages_its_members_tokens():
    """Each prototype's text half is its members' token features averaged position by position, over the members
    that have a token there; positions that fewer than half of them have are masked."""
    from languageguidedseg.prototypes import build_bank

    generator = torch.Generator().manual_seed(0)
    image, text = torch.randn(40, 16, generator=generator), torch.randn(40, 16, generator=generator)
    tokens = torch.randn(40, 6, 16, generator=generator)
    mask = torch.arange(6)[None] < torch.randint(1, 7, (40, 1), generator=generator)
    content = build_bank(image, text, None, clusters_per_class=4, seed=0, text_tokens=(tokens, mask))
    pooled = build_bank(image, text, None, clusters_per_class=4, seed=0)
    assert content.members == pooled.members  # the clustering is the same; only the text halves differ
    assert content.text_values.shape == (4, 6, 16) and content.token_mask.shape == (4, 6)
    assert pooled.text_values.shape == (4, 16) and pooled.token_mask is None
    for value, keep, members in zip(content.text_values, content.token_mask, content.members):
        present = mask[members]
        assert keep[0] and torch.equal(keep[1:], present[:, 1:].float().mean(0) >= 0.5)
        for t in range(6):
            if keep[t]:
                torch.testing.assert_close(value[t], tokens[members][present[:, t], t].mean(0))
            else:
                assert not value[t].any()
