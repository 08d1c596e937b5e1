"""The engine leaves process-wide state as it found it: inside 3D Slicer, that state belongs to every extension."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("fusion", [False, True])
def test_loading_and_running_a_model_leave_threads_and_the_fusion_flag_alone(tiny_model, fusion):
    from languageguidedseg.inference import Segmenter

    threads = torch.get_num_threads()
    previous = torch.jit.onednn_fusion_enabled()
    torch.jit.enable_onednn_fusion(fusion)
    try:
        segmenter = Segmenter.load(tiny_model, "cpu")
        assert torch.get_num_threads() == threads
        assert torch.jit.onednn_fusion_enabled() is fusion
        image = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)

        # Two threads segmenting at once (the Slicer module's worker and a script, say) leave the flag as found.
        errors = []

        def work():
            try:
                for _ in range(3):
                    segmenter.segment_array(image, report="left lower lobe")
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        workers = [threading.Thread(target=work) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        assert errors == []
        assert torch.jit.onednn_fusion_enabled() is fusion
        assert torch.get_num_threads() == threads
    finally:
        torch.jit.enable_onednn_fusion(previous)


@pytest.mark.parametrize("enabled", [False, True])
def test_loading_the_text_encoder_leaves_the_progress_bar_and_log_level_alone(enabled, distilbert_encoder):
    """Through transformers (an encoder that is not a plain BERT), loading changes its settings only for a while."""
    from transformers.utils import logging as hf_logging

    from languageguidedseg.text import TextEncoder

    verbosity = hf_logging.get_verbosity()
    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        TextEncoder(str(distilbert_encoder))
        assert hf_logging.is_progress_bar_enabled() is enabled
        assert hf_logging.get_verbosity() == verbosity
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_a_folder_without_dicom_is_refused_without_switching_itk_warnings(tmp_path, monkeypatch):
    import SimpleITK as sitk

    from languageguidedseg.errors import LgsegError
    from languageguidedseg.imageio import read_image

    switched = []
    monkeypatch.setattr(sitk.ProcessObject, "SetGlobalWarningDisplay", lambda *args: switched.append(args))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(LgsegError, match="contains no DICOM series"):
        read_image(tmp_path)
    assert switched == []
