"""Training/'s parts on their own: the strict YAML config, the learning-rate schedule, the augmentation and the
per-epoch sampling across processes (the end-to-end runs are in test_training.py)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from languageguidedseg.config import PreprocessConfig
from languageguidedseg.errors import LgsegError
from training.augment import augmenter
from training.config import AugmentationConfig, OptimisationConfig, TrainConfig, load_config
from training.data import Preloaded, epoch_loader
from training.optim import warmup_cosine
from training.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "Training" / "configs").glob("*.yaml"))
# The appearance augmentation of the kvasir-polyp config
APPEARANCE = dict(colour_balance=0.15, hue_degrees=10, saturation=0.4, gamma=0.4, blur_sigma=1.5, jpeg_quality=20)
# The image-only changes of another video system's frame
FRAME = dict(resolution=0.5, overlay_lines=6, specular=30, fov_radius=0.7)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.data.root().is_absolute() and config.optimisation.epochs > 0
    assert config.network.decoder_channels == (96, 64, 48, 32)
    assert config.preprocessing.size == 224


def test_a_typo_anywhere_in_the_config_names_the_key_and_the_known_ones(tmp_path):
    text = (REPO / "Training" / "configs" / "qata-cxr.yaml").read_text()
    for typo, section in (("  heads: 4", "network"), ("  tevia_alignment: 0.1", "losses"),
                          ("  size: 224", "preprocessing"), ("  epochs: 6", "optimisation")):
        path = tmp_path / "typo.yaml"
        path.write_text(text.replace(typo, typo.replace(":", "s:", 1)))
        with pytest.raises(LgsegError) as error:
            load_config(path)
        key = typo.split(":")[0].strip() + "s"
        assert f"unknown key '{key}' in {section}; known keys: " in str(error.value)
        assert typo.split(":")[0].strip() in str(error.value).split("known keys: ")[1]


def test_overrides_use_dotted_keys_and_are_checked(tmp_path):
    path = REPO / "Training" / "configs" / "kvasir-polyp.yaml"
    config = load_config(path, {"data.limit": 8, "optimisation.epochs": 1})
    assert config.data.limit == 8 and config.optimisation.epochs == 1
    with pytest.raises(LgsegError, match="optimisation.epochs must be a whole number"):
        load_config(path, {"optimisation.epochs": "one"})


def test_defaults_come_from_one_place():
    config = TrainConfig.from_dict({"name": "x", "data": {"path": "d"}})
    from languageguidedseg.config import ModelCard, NetworkConfig
    from training.losses import LossWeights

    assert config.network == NetworkConfig() and config.losses == LossWeights()
    assert config.preprocessing == PreprocessConfig()
    assert config.package.card() == ModelCard()  # the package's card is the engine's, plus the data citation
    assert config.package.threshold == ModelCard.threshold
    assert config.package.segment_color == ModelCard.segment_color


def _learning_rates(config: OptimisationConfig, steps_per_epoch: int, stop: int = -1, state=None):
    weight, bias = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [weight], "lr": 1e-3}, {"params": [bias], "lr": 5e-4}])
    scheduler = warmup_cosine(optimizer, config, steps_per_epoch)
    if state is not None:  # as --resume does
        optimizer.load_state_dict(state[0])
        scheduler.load_state_dict(state[1])
    rates = []
    total = steps_per_epoch * config.epochs
    for step in range(scheduler.last_epoch, total):
        if step == stop:
            return rates, (optimizer.state_dict(), scheduler.state_dict())
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates, None


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_zero():
    rates, _ = _learning_rates(OptimisationConfig(epochs=4, warmup_steps=10), steps_per_epoch=50)
    lr = [r[0] for r in rates]
    assert len(lr) == 200
    assert 0 < lr[0] < lr[1] < lr[9] < lr[10]
    assert lr[1] - lr[0] == pytest.approx(lr[9] - lr[8])  # linear
    assert lr[10] == pytest.approx(1e-3)  # the peak is the configured rate
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))  # then never rises
    assert lr[10 + 95] == pytest.approx(0.5e-3, rel=0.02)  # half-way through the decay: half the rate (cosine)
    assert lr[-1] < 1e-6
    # The encoder's group follows the same schedule at its own rate.
    assert all(r[1] == pytest.approx(r[0] / 2) for r in rates)


def test_short_runs_warm_up_over_at_most_a_tenth_of_the_steps():
    lr = [r[0] for r in _learning_rates(OptimisationConfig(epochs=1, warmup_steps=200), steps_per_epoch=30)[0]]
    assert lr.index(max(lr)) == 4  # 30 // 10 + 1 warm-up steps


def test_a_resumed_schedule_continues_exactly():
    config = OptimisationConfig(epochs=3, warmup_steps=5)
    full, _ = _learning_rates(config, steps_per_epoch=10)
    first, state = _learning_rates(config, steps_per_epoch=10, stop=12)
    rest, _ = _learning_rates(config, steps_per_epoch=10, state=state)
    assert first + rest == full


def _blob_set(count: int = 12, size: int = 64) -> Preloaded:
    """Images whose bright square is their mask, in the left half of the image."""
    images = torch.full((count, 3, size, size), -1.0)
    masks = torch.zeros(count, 1, size, size, dtype=torch.bool)
    for i in range(count):
        top = 8 + 2 * i
        images[i, :, top:top + 16, 6:22] = 1.0
        masks[i, 0, top:top + 16, 6:22] = True
    report_index = torch.tensor([i % 4 if i % 3 else -1 for i in range(count)])  # every third has no report
    return Preloaded([None] * count, images.half(), masks, report_index)


def _runtime(rank: int = 0, world: int = 1) -> Runtime:
    return Runtime(rank=rank, world=world, device=torch.device("cpu"), amp=False, show_progress=False)


def test_augmentation_moves_image_and_mask_together_and_never_flips():
    data = _blob_set()
    transform = augmenter(AugmentationConfig(rotate_degrees=10, scale=0.1, translate=0.05, intensity=0.1,
                                             affine_probability=1.0), PreprocessConfig(size=64))
    moved = 0
    for epoch in range(4):
        loader = epoch_loader(data, epoch, seed=0, batch_size=4, report_dropout=0.0, transform=transform,
                              bank_ready=True, runtime=_runtime())
        for batch in loader:
            for image, mask in zip(batch["image"], batch["mask"]):
                assert set(mask.unique().tolist()) <= {0.0, 1.0}
                bright = image[0] > 0.4  # the square is 1 +- 20 %, the background -1, the padding 0
                overlap = (bright & (mask[0] > 0)).sum() / (bright | (mask[0] > 0)).sum()
                assert overlap > 0.8  # the square and its mask stay together
                columns = torch.nonzero(mask[0])[:, 1].float()
                assert columns.mean() < 32  # still in the left half: no left-right flip
                moved += int(not any(torch.equal(mask, m.float()) for m in data.masks))
    assert moved > 20  # the affine transform does move most masks


@pytest.mark.parametrize("config", [
    AugmentationConfig(rotate_degrees=10, scale=0.1, translate=0.05, intensity=0.1),
    AugmentationConfig(rotate_degrees=10, intensity=0.1, **APPEARANCE),
    AugmentationConfig(rotate_degrees=10, border=0.3, **FRAME),
], ids=["geometry", "geometry+appearance", "geometry+frame"])
def test_augmentation_is_reproducible_for_a_seed_and_epoch(config):
    data = _blob_set()
    transform = augmenter(config, PreprocessConfig(size=64))

    def images(epoch: int, workers: int = 0) -> torch.Tensor:
        loader = epoch_loader(data, epoch, 0, 4, 0.3, transform, True, _runtime(), workers=workers)
        return torch.cat([batch["image"] for batch in loader])

    first = images(1)
    assert torch.equal(first, images(1, workers=1))  # whatever the number of loader workers
    assert torch.equal(first, images(1))  # a resumed run draws the same epoch again
    assert not torch.equal(first, images(2))


def _colour_set(count: int = 8, size: int = 64) -> Preloaded:
    """Normalised colour images (a reddish frame with a brighter blob and fine texture) and the blob's mask."""
    preprocess = PreprocessConfig(size=size)
    generator = torch.Generator().manual_seed(0)
    unit = torch.empty(count, 3, size, size)
    unit[:, 0], unit[:, 1], unit[:, 2] = 0.7, 0.35, 0.3
    unit += 0.1 * torch.rand(count, 3, size, size, generator=generator)
    masks = torch.zeros(count, 1, size, size, dtype=torch.bool)
    for i in range(count):
        masks[i, 0, 10 + 3 * i:30 + 3 * i, 8:28] = True
    unit = torch.where(masks, unit + 0.2, unit)
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    return Preloaded([None] * count, ((unit - mean) / std).half(), masks, torch.arange(count))


@pytest.mark.parametrize("key", sorted(APPEARANCE) + sorted(FRAME))
def test_appearance_augmentation_changes_the_image_never_the_mask(key):
    """Each appearance change alters the image (within its range) and leaves the mask exactly as it was: no flip,
    no shift."""
    data = _colour_set()
    transform = augmenter(AugmentationConfig(appearance_probability=1.0, **{key: {**APPEARANCE, **FRAME}[key]}),
                          PreprocessConfig(size=64))
    changed = 0
    for epoch in range(2):
        for batch in epoch_loader(data, epoch, 0, 4, 0.0, transform, True, _runtime()):
            for image, mask, i in zip(batch["image"], batch["mask"], batch["report_index"]):
                assert torch.equal(mask, data.masks[i].float())
                assert image.shape == data.images[i].shape and torch.isfinite(image).all()
                difference = (image - data.images[i].float()).abs().mean()
                assert difference < 1.0  # a plausible frame, not noise
                # A few highlights of a pixel or two change a 64 x 64 frame a little.
                changed += int(difference > (0.002 if key == "specular" else 0.01))
    assert changed >= 14  # almost every one of the 16 draws changes the image


def test_letterbox_borders_squeeze_image_and_mask_together():
    data = _colour_set()
    transform = augmenter(AugmentationConfig(appearance_probability=1.0, border=0.4), PreprocessConfig(size=64))
    squeezed = 0
    for batch in epoch_loader(data, 0, 0, 4, 0.0, transform, True, _runtime()):
        for image, masks, i in zip(batch["image"], batch["mask"], batch["report_index"]):
            mask, before = masks[0], data.masks[i, 0]
            assert mask.shape == before.shape and set(mask.unique().tolist()) <= {0.0, 1.0}
            assert mask.sum() <= before.sum()  # narrower, as tall
            assert mask.any(dim=1).sum() == before.any(dim=1).sum()
            # The blob (brighter) and its mask stay together; the bars are black.
            unit = image * torch.tensor(PreprocessConfig().std).view(3, 1, 1) + torch.tensor(
                PreprocessConfig().mean).view(3, 1, 1)
            bright = unit[0] > 0.85
            assert (bright & (mask > 0)).sum() / (bright | (mask > 0)).sum() > 0.7
            squeezed += int(mask.sum() < before.sum())
            if mask.sum() < before.sum() - 10:
                assert unit[:, :, 0].abs().max() < 0.05  # the left column is a black bar
    assert squeezed >= 4


def test_teachers_probabilities_move_with_the_mask_and_leave_the_draws_unchanged():
    """Distillation's soft targets take the mask's geometric changes (affine, letterbox), interpolated; the images
    and masks are those of the same run without them."""
    data = _blob_set()
    data.soft = torch.where(data.masks, 0.9, 0.1).half()  # a teacher that agrees with the mask
    plain = dataclasses.replace(data, soft=None)
    config = AugmentationConfig(rotate_degrees=10, scale=0.1, translate=0.05, affine_probability=1.0,
                                appearance_probability=1.0, border=0.3)
    with_soft = augmenter(config, PreprocessConfig(size=64), soft=True)
    without = augmenter(config, PreprocessConfig(size=64))
    for a, b in zip(epoch_loader(data, 1, 0, 4, 0.3, with_soft, True, _runtime()),
                    epoch_loader(plain, 1, 0, 4, 0.3, without, True, _runtime())):
        assert "soft" not in b and torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        for soft, mask in zip(a["soft"], a["mask"]):
            assert soft.shape == mask.shape and soft.min() >= 0.0 and soft.max() <= 0.9 + 1e-3
            inside = soft > 0.5
            assert (inside & (mask > 0)).sum() / (inside | (mask > 0)).sum() > 0.85  # moved together


def test_appearance_off_keeps_the_geometry_augmentation_draws():
    """Configs without the appearance keys (QaTa's) give the same augmented images as before they existed."""
    from monai.transforms import Compose, RandAffined, RandScaleIntensityd, RandShiftIntensityd

    config = AugmentationConfig(rotate_degrees=10, scale=0.1, translate=0.05, intensity=0.1)
    before = Compose([  # the transforms of the augmentation before the appearance keys
        RandAffined(keys=("image", "mask"), prob=0.7, rotate_range=math.radians(10), scale_range=0.1,
                    translate_range=0.05 * 64, mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ])
    data = _blob_set()

    def images(transform) -> torch.Tensor:
        return torch.cat([batch["image"] for batch in epoch_loader(data, 1, 0, 4, 0.3, transform, True, _runtime())])

    assert torch.equal(images(augmenter(config, PreprocessConfig(size=64))), images(before))
    assert augmenter(AugmentationConfig(), PreprocessConfig()) is None


def test_epoch_batches_split_the_pool_across_processes():
    data = _blob_set(count=20)
    data.report_index = torch.tensor([-1 if i % 5 == 0 else i for i in range(20)])
    for bank_ready, pool in ((False, 16), (True, 20)):
        seen = []
        for rank in range(2):
            loader = epoch_loader(data, 3, 0, 4, 0.0, None, bank_ready, _runtime(rank, 2))
            batches = list(loader)
            assert all(len(b["report_index"]) == 4 for b in batches)
            seen.append([int(i) for b in batches for i in b["report_index"]])
        # No sample on both ranks; whole steps of 2 x 4 images; before the bank only samples with reports train.
        assert not set(seen[0]) & set(seen[1]) - {-1}
        assert len(seen[0]) + len(seen[1]) == pool // 8 * 8
        if not bank_ready:
            assert -1 not in seen[0] + seen[1]
    # Another epoch, another order; the same epoch, the same order.
    order = [int(i) for b in epoch_loader(data, 3, 0, 4, 0.0, None, True, _runtime()) for i in b["report_index"]]
    again = [int(i) for b in epoch_loader(data, 3, 0, 4, 0.0, None, True, _runtime()) for i in b["report_index"]]
    other = [int(i) for b in epoch_loader(data, 4, 0, 4, 0.0, None, True, _runtime()) for i in b["report_index"]]
    assert order == again and order != other


def test_samples_without_a_report_and_dropped_reports_use_the_bank():
    data = _blob_set(count=40)
    for bank_ready in (False, True):
        batches = list(epoch_loader(data, 0, 0, 4, 0.5, None, bank_ready, _runtime()))
        report = torch.cat([b["report_index"] for b in batches])
        use_bank = torch.cat([b["use_bank"] for b in batches])
        assert use_bank[report < 0].all()
        if bank_ready:  # about half of the reports are dropped once there is a bank
            assert 0 < use_bank[report >= 0].sum() < (report >= 0).sum()
        else:
            assert not use_bank.any()


def test_train_py_reports_a_config_typo_in_one_line(tmp_path, capsys):
    import train

    path = tmp_path / "typo.yaml"
    path.write_text((REPO / "Training" / "configs" / "kvasir-polyp.yaml").read_text()
                    .replace("  decoder_channels:", "  decoder_chanels:"))
    assert train.main(["--config", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: config '{path}': unknown key 'decoder_chanels' in "
                                                   "network; known keys: encoder, text_dim, decoder_channels")


def test_train_py_set_overrides_any_key_and_checks_it(tmp_path, capsys):
    """--set (ablations) reaches any config key with a YAML value; a misspelt key or a bad item is one error line."""
    import train

    config = REPO / "Training" / "configs" / "kvasir-polyp.yaml"
    overrides = train.parse_settings(["losses.tevia_alignment=0", "network.decoder_channels=[64, 48, 32, 24]"])
    loaded = load_config(config, overrides)
    assert loaded.losses.tevia_alignment == 0 and loaded.losses.tmca_contrastive == 0.1
    assert tuple(loaded.network.decoder_channels) == (64, 48, 32, 24)
    for item, message in (("losses.tevia_aligment=0", "unknown key 'tevia_aligment' in losses"),
                          ("losses.tevia_alignment", "is not KEY=VALUE")):
        assert train.main(["--config", str(config), "--set", item, "--output", str(tmp_path / "m")]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and message in error[0]
        assert not (tmp_path / "m").exists()
