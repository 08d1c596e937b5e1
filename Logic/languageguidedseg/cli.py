"""The ``lgseg`` command line tool.

Errors the user can fix print one ``error:`` line on stderr and exit with code 2, never a traceback
(set ``LGSEG_DEBUG=1`` to see one). Reports are printed only where the user asks for them (``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TextIO

from . import __version__
from .errors import LgsegError
from .extras import missing_package_message
from .options import (
    AUTO_MODEL,
    add_device_option,
    add_json_option,
    add_model_option,
    add_quiet_option,
    add_sides_option,
    at_least,
    error_line,
)

if TYPE_CHECKING:  # annotations only: importing these loads torch
    import numpy as np

    from .data import Sample
    from .inference import Segmenter


def _read_report(args: argparse.Namespace) -> Optional[str]:
    if args.report is not None and args.report_file is not None:
        raise LgsegError("give either --report or --report-file, not both")
    if args.report_file is not None:
        path = Path(args.report_file)
        if path.is_dir():
            raise LgsegError(f"report file '{args.report_file}' is a folder; give a UTF-8 text file")
        if not path.exists():  # a pipe (e.g. /dev/stdin) is not a regular file but reads like one
            raise LgsegError(f"report file '{args.report_file}' does not exist; check the path")
        try:
            return Path(args.report_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LgsegError(f"cannot read report file '{args.report_file}' ({exc.__class__.__name__}); "
                             "give a UTF-8 text file") from exc
    return args.report


class _Progress:
    """A tqdm progress bar on stderr for long volumes; silent for a single slice."""

    def __init__(self, description: str, enabled: bool = True, unit: str = "slice"):
        self.description, self.enabled, self.unit = description, enabled, unit
        self.bar: Optional[Any] = None  # a tqdm bar, created on the first update of a multi-slice image

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 1:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.description, unit=self.unit, file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _segmenter_for(args: argparse.Namespace, array: np.ndarray, rgb: bool, axis: int,
                   slice_index: Optional[int]) -> Segmenter:
    """The model asked for with ``--model``; ``auto``: the installed one made for the image (``choose_model``)."""
    from .inference import Segmenter, choose_model

    if args.model != AUTO_MODEL:
        return Segmenter.load(args.model, args.device)
    load = functools.cache(functools.partial(Segmenter.load, device=args.device))  # the chosen one is kept
    name, _ = choose_model(array, rgb=rgb, axis=axis, slice_index=slice_index, load=load)
    return load(name)


def _domain_summary(result: Any) -> dict[str, Any]:
    """The ``--json`` keys of a result's applicability (see languageguidedseg.domain)."""
    return {"in_domain": result.in_domain, "domain_score": result.domain_score,
            "domain_slices": list(result.domain_slices) if result.domain_slices else None,
            "domain_warning": result.domain_warning}


def _segment(args: argparse.Namespace) -> int:
    from .batch import is_batch_input
    from .fileio import check_writable
    from .imageio import check_mask_path, image_array, image_geometry, is_rgb, read_image, spatial_shape, write_mask

    if is_batch_input(args.image):
        return _segment_batch(args)
    batch_only = [f"--{name.replace('_', '-')}" for name in ("format", "workers", "cluster", "save_reports")
                  if getattr(args, name) not in (None, False)]
    if batch_only:
        raise LgsegError(f"{batch_only[0]} is for a folder or manifest input, not a single image")
    # Everything that can be checked cheaply is checked before the model is loaded and the image segmented.
    report = _read_report(args)
    if args.axis is not None and args.slice is None:
        raise LgsegError("--axis needs --slice K as well")
    check_mask_path(args.output, (1, 1))  # the file type now; whether a PNG fits once the image is read
    check_writable(args.output)
    if Path(args.output).resolve() == Path(args.image).resolve():
        raise LgsegError(f"the output '{args.output}' would overwrite the input image; choose another output path")
    image = read_image(args.image)
    check_mask_path(args.output, spatial_shape(image))

    # Importing the engine imports torch: only once the inputs are known to be usable.
    array, rgb, axis = image_array(image), is_rgb(image), 2 if args.axis is None else args.axis
    segmenter = _segmenter_for(args, array, rgb, axis, args.slice)
    progress = _Progress("segmenting", enabled=not args.quiet)
    try:
        result = segmenter.segment_array(array, rgb=rgb, report=report, axis=axis, slice_index=args.slice,
                                         threshold=args.threshold, progress=progress, sides=args.sides,
                                         geometry=image_geometry(image, args.image))
    finally:
        progress.close()
    card = segmenter.config.card
    output = write_mask(result.mask, image, args.output, segment_name=card.segment_name, color=card.segment_color)
    summary = {
        "report": result.report,
        "report_source": result.report_source,
        "similarity": result.similarity,
        "seconds": round(result.seconds, 4),
        "foreground_fraction": round(result.foreground_fraction, 6),
        "output": str(output),
        "model": segmenter.config.name,
        "device": str(segmenter.device),
        "sides": result.sides,
        "orientation": result.orientation,
        **_domain_summary(result),
        "report_warnings": result.report_warnings,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        # The report is not echoed here: it may identify a patient (use --json to see the report that was used).
        source = "the report" if result.report_source == "given" else "the prototype approximation (no report)"
        print(f"wrote {output} with model {summary['model']}: {summary['foreground_fraction']:.2%} foreground, "
              f"guided by {source}, {result.seconds:.2f} s; {result.sides_label}")
        if result.domain_warning:
            print(f"warning: {result.domain_warning}", file=sys.stderr)
        for warning in result.report_warnings:  # sides only, never the report's text
            print(f"warning: {warning}", file=sys.stderr)
    return 0


def _segment_batch(args: argparse.Namespace) -> int:
    """``lgseg segment FOLDER|MANIFEST --output FOLDER``: see languageguidedseg.batch and docs/batch.md."""
    from . import batch

    for given, flag in ((args.report is not None or args.report_file is not None, "--report"),
                        (args.slice is not None or args.axis is not None, "--slice")):
        if given:
            raise LgsegError(f"{flag} is for a single image; a manifest gives each image its report (column "
                             "'report'), and a folder or manifest input segments whole images")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise LgsegError(f"threshold must lie between 0 and 1, not {args.threshold}", option="threshold")
    if Path(args.image).is_dir() and Path(args.output).resolve() == Path(args.image).resolve():
        raise LgsegError(f"the output folder '{args.output}' is the input folder: the masks would overwrite the "
                         "images; choose another output folder", option="output")
    workers = args.workers or batch.default_workers()
    if args.model != AUTO_MODEL:
        from .package import find_model

        find_model(args.model)  # a wrong name fails now, not once per input
    settings = batch.BatchSettings(
        source=str(Path(args.image).resolve()), output_dir=str(Path(args.output).resolve()),
        model=batch.absolute_model(args.model), device=args.device, threshold=args.threshold, sides=args.sides,
        format=args.format, save_reports=args.save_reports)
    items = batch.collect_inputs(args.image, args.output, args.format)
    if args.cluster:
        from .cluster import DaskEngine  # the [cluster] extra: a missing one says so before anything is written

        def start() -> Any:
            return DaskEngine(args.cluster, settings, workers)
    else:
        def start() -> Any:
            return batch.LocalPool(settings, workers)
    batch.prepare_output(settings)
    progress = batch.ProgressBar(enabled=not args.quiet)
    try:
        summary = batch.run_batch(settings, items, start, progress)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        print(f"{summary.done} segmented, {summary.skipped} done before, {summary.failed} failed of "
              f"{summary.inputs} inputs in {summary.seconds:.1f} s; masks in {args.output}, rows in {summary.results}")
    if summary.interrupted:
        print("error: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    if summary.failed:
        print(f"error: {summary.failed} input(s) failed; see the error column of {summary.results}", file=sys.stderr)
        return 3
    return 0


def _models(args: argparse.Namespace) -> int:
    from .package import installed_models_folder, list_models, user_models_folder

    models = list_models()
    if args.json:
        print(json.dumps([m.to_dict() for m in models]))
        return 0
    if not models:
        print(f"no models installed (looked in {user_models_folder()} and {installed_models_folder()})")
        return 0
    print(f"{'name':<16} {'task':<44} {'licence':<28} {'size':>8}")
    for m in models:
        print(f"{m.name:<16} {m.task[:44]:<44} {m.licence[:28]:<28} {m.size_mb:>6.1f}MB")
    return 0


def _approximate(args: argparse.Namespace) -> int:
    from .imageio import image_array, image_geometry, is_rgb, read_image

    image = read_image(args.image)
    array, rgb = image_array(image), is_rgb(image)
    segmenter = _segmenter_for(args, array, rgb, args.axis, args.slice)
    approx = segmenter.approximate(array, rgb=rgb, axis=args.axis, slice_index=args.slice,
                                   top_k=args.top_k, sides=args.sides, geometry=image_geometry(image, args.image))
    if args.json:
        print(json.dumps({"report": approx.report,
                          "similarity": None if approx.similarity is None else round(approx.similarity, 4),
                          "top": [{"report": r, "similarity": round(s, 4)} for r, s in approx.top],
                          "model": segmenter.config.name, "sides": approx.sides,
                          "orientation": approx.orientation, **_domain_summary(approx)}))
    elif approx.domain_warning:  # no report is approximated for an image the model was not made for
        print(f"warning: {approx.domain_warning}", file=sys.stderr)
    else:
        print(approx.sides_label)
        print(f"{approx.report}  (similarity {approx.similarity:.3f}; model {segmenter.config.name})")
        for r, s in approx.top[1:]:
            print(f"  also: {r}  ({s:.3f})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:

    from .corruptions import corrupt_pair, parse_corruptions
    from .data import dataset_report_sides, load_pair, load_split

    if args.limit is not None and args.limit < 1:
        raise LgsegError(f"--limit must be at least 1, not {args.limit}")
    # With --limit only the images used are read (and checked by load_pair), not the whole split.
    samples = load_split(args.data_dir, args.split, validate=args.limit is None)
    if args.limit is not None:
        samples = samples[:args.limit]
    if not samples:
        raise LgsegError(f"the {args.split} split of '{args.data_dir}' has no images; choose another split or folder")
    corruptions = parse_corruptions(args.corrupt) if args.corrupt else []

    from .evaluation import evaluate  # imports torch: only once the data set is known to be usable
    from .inference import Segmenter

    segmenter = Segmenter.load(args.model, args.device)
    # Reports are scored in the data set's own convention, translated into the model's; data set images are 2D files
    # without orientation, so radiological display is assumed (as lgseg segment does for them).
    data_sides = args.sides or dataset_report_sides(args.data_dir)
    if data_sides is None:
        data_sides = segmenter.report_sides
        print(f"warning: '{args.data_dir}' has no dataset.json declaring report_sides; its reports are read in the "
              f"model's own convention ({data_sides}); pass --sides to say otherwise", file=sys.stderr)
    elif (data_sides == "none") != (segmenter.report_sides == "none"):
        # Likely the wrong model (the default one on another data set): its scores would mean nothing.
        data_kind = "name no sides" if data_sides == "none" else f"name sides ({data_sides})"
        model_kind = "that do not" if segmenter.report_sides == "none" else "that do"
        print(f"warning: the reports of '{args.data_dir}' {data_kind} but model '{segmenter.config.name}' was "
              f"trained on reports {model_kind}; check --model ('lgseg models' lists the installed ones)",
              file=sys.stderr)
    progress = _Progress(f"evaluating {args.split}", enabled=not args.quiet, unit="image")

    def load(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        image, mask = load_pair(sample)
        corrupted, moved = corrupt_pair(image, mask, corruptions, segmenter.preprocess.size)
        return corrupted, moved if moved is not None else mask

    try:
        evaluation = evaluate(segmenter, samples, args.reports, sides=data_sides, progress=progress,
                              load=load if corruptions else load_pair)
    finally:
        progress.close()
    result, threshold = evaluation.scores, segmenter.config.card.threshold
    without_report = evaluation.without_report
    # The probes read the clean images: with --corrupt they are left out rather than reported for other images.
    probes = (_probes(segmenter, samples, args) if args.probes and data_sides == "image" and not corruptions
              else {})
    summary = {
        "dice": round(result.dice, 6),
        "iou": round(result.iou, 6),
        "mean_dice": round(result.mean_dice, 6),
        "mean_iou": round(result.mean_iou, 6),
        "n": result.n,
        "reports": args.reports,
        "without_report": without_report,
        "split": args.split,
        "sides": data_sides,
        "corrupt": ",".join(str(c) for c in corruptions) or None,
        "model": segmenter.config.name,
        "threshold": threshold,
        "seconds": round(evaluation.seconds, 2),
        # The share of the split's images that the model's applicability check judges in its domain.
        "in_domain_rate": None if evaluation.in_domain_rate is None else round(evaluation.in_domain_rate, 4),
        **probes,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        guidance = ("the reports" if args.reports == "given" else "the prototype bank (reports ignored)")
        print(f"{result.n} {args.split} images of {args.data_dir}, guided by {guidance} (left/right: {data_sides}), "
              f"model {summary['model']}")
        if corruptions:
            print(f"images corrupted: {summary['corrupt']}")
        print(f"Dice {result.dice:.4f}  IoU {result.iou:.4f}  (micro-averaged over all pixels, as in the papers)")
        print(f"mean per-image Dice {result.mean_dice:.4f}  IoU {result.mean_iou:.4f}")
        if evaluation.in_domain_rate is not None:
            print(f"in-domain rate {evaluation.in_domain_rate:.4f} (the share of the images that look like those "
                  "the model was trained on)")
        if args.reports == "given" and without_report:
            print(f"{without_report} images had no report and were guided by the prototype bank")
        if "steering" in probes:
            print(f"steering {probes['steering']:.4f} on {probes['steering_n']} bilateral images (1 = a left / right "
                  f"report puts the whole mask on that side, 0 = the report is ignored)")
        if "zone_steering" in probes:
            print(f"zone steering {probes['zone_steering']:.4f} on {probes['zone_steering_n']} whole-side lesions "
                  "(1 = an upper / lower report puts the whole mask above / below the lesion's mid-height, 0 = the "
                  "zone is ignored)")
        if "laterality_balanced_accuracy" in probes:
            recall = ", ".join(f"{k} {v:.2f}" for k, v in probes["laterality_recall"].items())
            print(f"approximated report laterality: balanced accuracy {probes['laterality_balanced_accuracy']:.4f} "
                  f"on {probes['laterality_n']} images ({recall}; chance 0.33)")
        if "report_warning_rate" in probes:
            print(f"report check: {probes['report_warning_rate']:.4f} of {probes['report_warning_n']} true reports "
                  f"warned about, {probes['swapped_side_flag_rate']:.4f} of {probes['swapped_side_flag_n']} "
                  "unilateral reports with the side swapped")
    return 0


def _probes(segmenter: Segmenter, samples: Sequence[Sample], args: argparse.Namespace) -> dict:
    """The steering, zone steering and laterality probes and the report check (data sets whose reports name the
    image's sides)."""
    from .probes import laterality_probe, report_check_probe, steering_probe, zone_steering_probe
    from .sides import RADIOLOGICAL_DISPLAY, translate_report

    figures = {}
    for name, probe in (("steering probe", steering_probe), ("zone steering probe", zone_steering_probe)):
        progress = _Progress(name, enabled=not args.quiet, unit="image")
        try:
            result = probe(lambda images, reports: segmenter.predict_slices(images, reports)[0], samples,
                           segmenter.config.card.threshold, segmenter.batch_size, progress=progress)
        finally:
            progress.close()
        if result.n:
            figures.update(result.to_dict())
    progress = _Progress("laterality probe", enabled=not args.quiet, unit="image")
    try:
        laterality = laterality_probe(segmenter.approximated_reports, samples, segmenter.batch_size,
                                      progress=progress)
    finally:
        progress.close()
    if laterality.n:
        figures.update(laterality.to_dict())
    check = segmenter.report_check
    if check is not None:  # the presences kept by the laterality probe: no second pass over the images
        def warned(images: np.ndarray, reports: Sequence[Optional[str]]) -> list[bool]:
            texts = [translate_report(r, "image", segmenter.report_sides, RADIOLOGICAL_DISPLAY) if r else r
                     for r in reports]
            return [found is not None for found in check.contradictions(images, texts)]

        progress = _Progress("report check", enabled=not args.quiet, unit="image")
        try:
            figures.update(report_check_probe(warned, samples, segmenter.batch_size, progress=progress).to_dict())
        finally:
            progress.close()
    return figures


def _benchmark(args: argparse.Namespace) -> int:
    from .benchmark import run_batch_benchmark, run_benchmark

    if args.batch:
        figures = run_batch_benchmark(args.data, images=args.batch_images, per_process_images=args.per_process_images,
                                      device=args.device, workers=args.workers)
    else:
        figures = run_benchmark(device=args.device, volume_slices=args.volume_slices, repeats=args.repeats)
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:<22} {value}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``error:`` line (exit code 2), like every other error of the tool."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lgseg", description="Language-guided medical image segmentation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment an image, guided by a report or by the prototype bank")
    add_model_option(seg, auto=True)
    for add in (add_device_option, add_json_option, add_quiet_option):
        add(seg)
    seg.add_argument("image", help="2D image (PNG, JPEG, BMP, TIFF) or volume (NIfTI, NRRD, MHA, DICOM folder); "
                                   "or, for a batch, a folder of them or a manifest (.csv, .jsonl)")
    seg.add_argument("--report", help="the report text; leave out to use the prototype approximation")
    seg.add_argument("--report-file", help="read the report from a UTF-8 text file")
    seg.add_argument("--slice", type=int, help="segment only slice K of a volume")
    seg.add_argument("--axis", type=int, choices=(0, 1, 2), help="slicing axis in IJK order (default 2)")
    seg.add_argument("--threshold", type=float, help="probability threshold (default: the model's)")
    seg.add_argument("--output", "-o", required=True, help="mask file: .png, .nii.gz, .nrrd, .mha or .seg.nrrd; "
                                                           "for a batch, the output folder")
    add_sides_option(seg)
    batch = seg.add_argument_group("batch (a folder or manifest input; see docs/batch.md)")
    from .batch import FORMATS  # no torch

    batch.add_argument("--format", choices=FORMATS,
                       help="mask format (default: png for 2D images, nii.gz for volumes)")
    batch.add_argument("--workers", type=at_least(1),
                       help="worker processes, each loading the model once (default: one per core, at most 8)")
    batch.add_argument("--cluster", metavar="local|ADDRESS",
                       help="run on a Dask cluster: 'local' starts one here, else a scheduler's address "
                            "(needs pip install 'languageguidedseg[cluster]')")
    batch.add_argument("--save-reports", action="store_true",
                       help="also write each report used into results.csv (off: reports may identify a patient)")
    seg.set_defaults(func=_segment)

    models = sub.add_parser("models", help="list installed model packages")
    add_json_option(models)
    models.set_defaults(func=_models)

    approx = sub.add_parser("approximate", help="the prototype approximation of an image's report")
    add_model_option(approx, auto=True)
    for add in (add_device_option, add_json_option):
        add(approx)
    approx.add_argument("image")
    approx.add_argument("--slice", type=int, help="slice of a volume (default: the middle one)")
    approx.add_argument("--axis", type=int, default=2, choices=(0, 1, 2))
    approx.add_argument("--top-k", type=at_least(1), default=3)
    add_sides_option(approx)
    approx.set_defaults(func=_approximate)

    evaluate = sub.add_parser("evaluate", help="Dice and IoU of a model on a data set split")
    for add in (add_model_option, add_device_option, add_json_option, add_quiet_option):
        add(evaluate)
    evaluate.add_argument("data_dir", help="data set folder (split.json layout, LViT or GuideDecoder layout)")
    evaluate.add_argument("--split", default="val", choices=("train", "val", "test"))
    evaluate.add_argument("--reports", default="given", choices=("given", "none"),
                          help="given: each image's report guides it (the prototype bank where there is none); "
                               "none: the prototype bank guides every image")
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N images of the split")
    evaluate.add_argument("--sides", choices=("image", "patient", "none"),
                          help="what left and right mean in the data set's reports (default: its dataset.json)")
    evaluate.add_argument("--corrupt", metavar="SPEC",
                          help="corrupt each 8-bit image first, at fixed severities applied in order, e.g. "
                               "jpeg:30,blur:2 (names: hue, saturation, colour, gamma, blur, jpeg, border, resize, "
                               "aspect, overlay, specular, fov; see languageguidedseg/corruptions.py); skips the "
                               "probes")
    evaluate.add_argument("--no-probes", dest="probes", action="store_false",
                          help="skip the steering, zone steering and laterality probes and the report check (run where "
                               "the data set's reports name the image's sides)")
    evaluate.set_defaults(func=_evaluate)

    bench = sub.add_parser("benchmark",
                           help="per-slice latency and start-up time against a GuideDecoder-sized reference; "
                                "--batch: batch segmentation's throughput")
    add_device_option(bench, default="cpu")
    add_json_option(bench)
    bench.add_argument("--volume-slices", type=at_least(1), default=100)
    bench.add_argument("--repeats", type=at_least(1), default=10)
    bench.add_argument("--batch", action="store_true",
                       help="instead: batch segmentation's images/s against one lgseg segment process per image")
    bench.add_argument("--data", default="../shared/data/qata-cov19", help="--batch: the data set (val split)")
    bench.add_argument("--batch-images", type=at_least(1), default=200, help="--batch: images in the batch")
    bench.add_argument("--per-process-images", type=at_least(1), default=20,
                       help="--batch: images segmented by one process each")
    bench.add_argument("--workers", type=at_least(1), help="--batch: the batch's workers (default: its own)")
    bench.set_defaults(func=_benchmark)

    from .web.command import add_serve_command  # the web page: needs the [web] extra only when it runs

    add_serve_command(sub)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Optional[TextIO] = None, line: Optional[str] = None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # Warnings as one line each, for this call only (main may run inside another program, e.g. the tests).
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            return args.func(args)
        except LgsegError as exc:
            print(error_line(exc, args), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # the reader stopped early (e.g. '| head'): nothing more to say
            return 141
        except Exception as exc:  # noqa: BLE001 - users get one line; developers set LGSEG_DEBUG=1
            missing = missing_package_message(exc) if isinstance(exc, ImportError) else None
            if missing is not None:  # an optional package (pip install .[extra]), not a bug
                print(f"error: lgseg {args.command}: {missing}", file=sys.stderr)
                return 2
            if os.environ.get("LGSEG_DEBUG"):
                raise
            reason = " ".join(str(exc).split())[:300]
            print(f"error: unexpected {exc.__class__.__name__}: {reason} (set LGSEG_DEBUG=1 for details)",
                  file=sys.stderr)
            return 1


def run() -> None:
    """The ``lgseg`` command: :func:`main` on the command line's arguments, then the process ends at once.

    Every output file is complete and closed when ``main`` returns, so after flushing stdout, stderr and the logging
    handlers the process skips Python's interpreter teardown, which with PyTorch and transformers loaded spends about
    half a second freeing objects one by one. ``main`` itself returns normally (programs and tests call it).
    """
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to deliver
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
