"""Batch segmentation: a folder or a manifest in, one mask per input and ``results.csv`` out; resumable, in parallel.

The inputs (:func:`collect_inputs`) are the images and DICOM series under a folder, or the rows of a manifest (CSV or
JSON Lines with ``image`` and optionally ``report``, ``model`` and ``output``). Each input is segmented by
:func:`segment_item`, in worker processes that each load the model once (:class:`LocalPool`) or on a Dask cluster
(:mod:`languageguidedseg.cluster`); :func:`run_batch` hands the inputs out, records one row per input and keeps
``results.csv`` complete (written atomically, as every mask is), so that a run stopped at any point continues where
it stopped when it is run again: an input whose row has no error and whose mask exists is not segmented again.

Report texts go into ``results.csv`` only when asked for (``save_reports``): they may identify a patient.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from .errors import LgsegError
from .fileio import PathLike, atomic_path, check_writable, full_suffix
from .options import AUTO_MODEL, available_cores

if TYPE_CHECKING:  # annotations only: the single-image command imports this module to tell a batch from an image
    from multiprocessing.connection import Connection

    from .runner import ModelCache

Row = dict[str, str]

RESULTS_FILE = "results.csv"
SETTINGS_FILE = ".lgseg-batch.json"  # the input and settings that made an output folder's masks (prepare_output)
COLUMNS = ("image", "output", "model", "report_source", "similarity", "in_domain", "report_warnings",
           "foreground_fraction", "volume_ml", "seconds", "error")
REPORT_COLUMN = "report"  # after report_source, with save_reports only
MANIFEST_COLUMNS = ("image", "report", "model", "output")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
FORMATS = ("nii.gz", "nrrd", "seg.nrrd", "png")  # --format; default: png for 2D images, nii.gz for volumes
# The files of a folder that are inputs; a folder holding DICOM files is one input (a series).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
SAVE_EVERY_S = 2.0  # results.csv is rewritten at most this often while a batch runs (and always at its end)


@dataclass(frozen=True)
class BatchItem:
    """One input: ``image`` as results.csv names it, ``path`` the file or DICOM folder (absolute), the mask's path
    relative to the output folder without its suffix (``stem``) and with ``suffix`` (None: ``.png`` for a 2D image,
    ``.nii.gz`` for a volume); ``error``: why the input cannot be segmented, found while listing the inputs."""

    image: str
    path: str
    stem: str
    suffix: Optional[str] = None
    report: Optional[str] = None
    model: Optional[str] = None
    error: str = ""


@dataclass(frozen=True)
class BatchSettings:
    """What every input of a batch is segmented with. ``source`` (the input folder or manifest) and the settings
    that change the masks or results.csv are recorded in the output folder: a rerun resumes only with the same ones
    (:func:`prepare_output`)."""

    source: str
    output_dir: str
    model: str = AUTO_MODEL
    device: str = "auto"
    threshold: Optional[float] = None
    sides: str = "patient"
    format: Optional[str] = None
    save_reports: bool = False

    def recorded(self) -> dict[str, Any]:
        """The settings a resumed run must share (not the device: the same masks on either)."""
        values = asdict(self)
        del values["output_dir"], values["device"]
        return values


@dataclass
class BatchSummary:
    """What a batch did: inputs in all, segmented now, skipped (done before), failed, and whether Ctrl+C stopped it."""

    inputs: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    results: str = ""

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["images_per_s"] = round(self.done / self.seconds, 3) if self.seconds > 0 else None
        return values


def is_batch_input(source: PathLike) -> bool:
    """Whether ``lgseg segment`` takes ``source`` as a batch: a manifest, or a folder that does not itself hold a
    DICOM series (which is one image, as before)."""
    path = Path(source)
    if full_suffix(path) in MANIFEST_SUFFIXES and not path.is_dir():
        return True
    return path.is_dir() and not _holds_dicom_file(path)


def _holds_dicom_file(folder: Path) -> bool:
    from .imageio import _holds_dicom_file as holds  # the one check of what a DICOM folder is (imageio's reader's)

    return holds(folder)


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def collect_inputs(source: PathLike, output_dir: PathLike, fmt: Optional[str] = None) -> list[BatchItem]:
    """The inputs of a folder (sorted; see :func:`folder_inputs`) or a manifest (in its order; see
    :func:`manifest_inputs`), with their masks' paths; ``fmt`` one of :data:`FORMATS` or None (by image)."""
    if fmt is not None and fmt not in FORMATS:
        raise LgsegError(f"unknown mask format '{fmt}'; choose one of {', '.join(FORMATS)}", option="format")
    path = Path(source)
    if not path.exists():
        raise LgsegError(f"input '{source}' does not exist; check the path")
    items = (folder_inputs(path, Path(output_dir)) if path.is_dir() else manifest_inputs(path))
    suffix = None if fmt is None else "." + fmt
    return _unique_outputs([item if item.suffix else replace(item, suffix=suffix) for item in items])


def _strip_image_suffix(relative: str) -> str:
    suffix = full_suffix(relative)
    return relative[:-len(suffix)] if suffix in IMAGE_SUFFIXES else relative


def folder_inputs(folder: Path, output_dir: Path) -> list[BatchItem]:
    """Every image file (:data:`IMAGE_SUFFIXES`) under ``folder`` and every sub-folder holding DICOM files (one
    series each), in sorted order; hidden files and folders and the output folder are left out. The masks mirror
    the relative paths."""
    root, skip = folder.resolve(), output_dir.resolve()
    items = []
    seen = set()  # the real folders walked: a linked folder is followed, a link back up is not
    for current, folders, files in os.walk(root, followlinks=True):
        here = Path(current)
        seen.add(here.resolve())
        folders[:] = sorted(name for name in folders if not name.startswith(".")
                            and (here / name).resolve() not in seen and (here / name).resolve() != skip)
        relative = here.relative_to(root)
        if here != root and _holds_dicom_file(here):
            items.append(BatchItem(image=relative.as_posix(), path=str(here), stem=relative.as_posix()))
        for name in sorted(files):
            if name.startswith(".") or full_suffix(name) not in IMAGE_SUFFIXES or name.lower().endswith(".seg.nrrd"):
                continue
            image = (relative / name).as_posix()
            items.append(BatchItem(image=image, path=str(here / name), stem=_strip_image_suffix(image)))
    if not items:
        raise LgsegError(f"folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)}) and no folders with a "
                         "DICOM series; choose a folder of images or a manifest")
    return items


def manifest_inputs(manifest: Path) -> list[BatchItem]:
    """The rows of a CSV (with a header row) or JSON Lines manifest: ``image`` (a file or DICOM folder; relative to
    the manifest's folder), and optionally ``report`` (empty: none, the prototype bank guides), ``model`` (empty: the
    command's) and ``output`` (the mask's path relative to the output folder, with a mask suffix; empty: the
    image's path relative to the manifest's folder, or to the images' common folder when they are not all under
    it: those without an output). The whole manifest is checked before any image is segmented."""
    suffix = full_suffix(manifest)
    if suffix not in MANIFEST_SUFFIXES:
        raise LgsegError(f"'{manifest}' is neither a folder nor a manifest; give a folder of images, a .csv or a "
                         ".jsonl manifest, or a single image with a mask file as the output")
    try:
        text = manifest.read_text(encoding="utf-8-sig")  # a spreadsheet's CSV may start with a byte-order mark
    except (OSError, UnicodeDecodeError) as exc:
        raise LgsegError(f"cannot read manifest '{manifest}' ({exc.__class__.__name__}); give a UTF-8 text file") \
            from exc
    rows = _csv_rows(manifest, text) if suffix == ".csv" else _jsonl_rows(manifest, text)
    if not rows:
        raise LgsegError(f"manifest '{manifest}' lists no images; add one row per image")
    base = manifest.resolve().parent
    paths = [Path(os.path.normpath(base / row["image"])) for _, row in rows]  # an absolute image stays as it is
    elsewhere = [str(p.parent) for p, (_, row) in zip(paths, rows) if not row.get("output") and not _is_under(p, base)]
    common = Path(os.path.commonpath(elsewhere)) if elsewhere else base  # images elsewhere: from the folder they share
    items = []
    for (line, row), path in zip(rows, paths):
        output = row.get("output") or ""
        if output:
            _check_manifest_output(manifest, line, output)
            stem, mask_suffix = output[:-len(full_suffix(output))], full_suffix(output)
        else:
            mirrored = path.relative_to(base if _is_under(path, base) else common)
            stem, mask_suffix = _strip_image_suffix(mirrored.as_posix()), None
        items.append(BatchItem(image=row["image"], path=str(path), stem=stem, suffix=mask_suffix,
                               report=row.get("report") or None,
                               model=absolute_model(row["model"]) if row.get("model") else None))
    return items


def _is_under(path: Path, folder: Path) -> bool:
    try:
        return ".." not in path.relative_to(folder).parts
    except ValueError:
        return False


def _check_manifest_output(manifest: Path, line: int, output: str) -> None:
    from .imageio import MASK_SUFFIXES

    where = f"manifest '{manifest}' line {line}"
    if Path(output).is_absolute() or ".." in Path(output).parts:
        raise LgsegError(f"{where}: output '{output}' must be a path inside the output folder, relative to it")
    if full_suffix(output) not in MASK_SUFFIXES:
        raise LgsegError(f"{where}: output '{output}' needs a mask suffix: {', '.join(MASK_SUFFIXES)}")


def _csv_rows(manifest: Path, text: str) -> list[tuple[int, dict[str, str]]]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        return []
    except csv.Error as exc:
        raise LgsegError(f"cannot read manifest '{manifest}' as CSV ({exc}); check its first line") from exc
    _check_columns(manifest, header)
    rows = []
    try:
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue  # a blank line
            if len(cells) > len(header):
                raise LgsegError(f"manifest '{manifest}' line {reader.line_num} has {len(cells)} cells but the "
                                 f"header names {len(header)} columns; quote cells that hold commas")
            rows.append((reader.line_num, _manifest_row(manifest, reader.line_num, dict(zip(header, cells)))))
    except csv.Error as exc:
        raise LgsegError(f"cannot read manifest '{manifest}' line {reader.line_num} as CSV ({exc})") from exc
    return rows


def _jsonl_rows(manifest: Path, text: str) -> list[tuple[int, dict[str, str]]]:
    rows = []
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            values = json.loads(content)
        except json.JSONDecodeError as exc:
            raise LgsegError(f"manifest '{manifest}' line {line} is not JSON ({exc.msg}); write one JSON object "
                             "per line") from exc
        if not isinstance(values, dict):
            raise LgsegError(f"manifest '{manifest}' line {line} is not a JSON object; write one object per line, "
                             'e.g. {"image": "a.png", "report": "..."}')
        _check_columns(manifest, list(values), line)
        if any(value is not None and not isinstance(value, str) for value in values.values()):
            raise LgsegError(f"manifest '{manifest}' line {line}: the values must be strings (or null)")
        rows.append((line, _manifest_row(manifest, line, {k: v or "" for k, v in values.items()})))
    return rows


def _check_columns(manifest: Path, names: Sequence[str], line: Optional[int] = None) -> None:
    where = f"manifest '{manifest}'" + (f" line {line}" if line is not None else "")
    unknown = [name for name in names if name not in MANIFEST_COLUMNS]
    if unknown:
        raise LgsegError(f"{where} has an unknown column '{unknown[0]}'; the columns are "
                         f"{', '.join(MANIFEST_COLUMNS)} (image is needed, the others may be left out)")
    if "image" not in names:
        raise LgsegError(f"{where} has no 'image' column; name each row's image file or DICOM folder in it")


def _manifest_row(manifest: Path, line: int, row: dict[str, str]) -> dict[str, str]:
    cleaned = {key: value.strip() if key != "report" else value for key, value in row.items()}
    if not cleaned.get("image"):
        raise LgsegError(f"manifest '{manifest}' line {line} has no image; give each row an image path")
    return cleaned


def _unique_outputs(items: list[BatchItem]) -> list[BatchItem]:
    """An input whose mask would overwrite an earlier input's (same path without suffix) gets an error instead."""
    first: dict[str, str] = {}
    checked = []
    for item in items:
        key = item.stem.lower()  # case-insensitive file systems would clash too
        if key in first and not item.error:
            item = replace(item, error=f"its mask would overwrite the mask of '{first[key]}'; give them different "
                                       "names, or list them in a manifest with different outputs")
        first.setdefault(key, item.image)
        checked.append(item)
    return checked


# ---------------------------------------------------------------------------------------------------------------
# One input
# ---------------------------------------------------------------------------------------------------------------


def segment_item(item: BatchItem, settings: BatchSettings, models: ModelCache) -> Row:
    """Read, segment and write one input; its results.csv row. A problem with the input becomes the row's
    ``error`` (one line) instead of an exception; the mask is written atomically, so it is complete or absent."""
    from .imageio import check_mask_path, image_array, image_geometry, is_rgb, read_image, spatial_shape, write_mask

    started, loading = time.perf_counter(), [0.0]
    model = item.model or settings.model

    def load(name: str) -> Any:  # the models a worker holds; the time to load one is not this input's
        held = models.holds(name, settings.device)
        begun = time.perf_counter()
        segmenter = models.get(name, settings.device)
        if not held:
            loading[0] += time.perf_counter() - begun
        return segmenter

    row = {column: "" for column in COLUMNS}
    row.update(image=item.image, model="" if model == AUTO_MODEL else _model_label(model))
    try:
        if item.error:
            raise LgsegError(item.error)
        image = read_image(item.path)
        suffix = item.suffix or (".png" if image.GetDimension() == 2 else ".nii.gz")
        output = Path(settings.output_dir) / (item.stem + suffix)
        check_mask_path(output, spatial_shape(image))
        if output.resolve() == Path(item.path).resolve():
            raise LgsegError(f"its mask '{item.stem + suffix}' would overwrite the image; choose an output folder "
                             "outside the input's folder, or another --format")
        array, rgb = image_array(image), is_rgb(image)
        if model == AUTO_MODEL:
            from .inference import choose_model

            model, _ = choose_model(array, rgb=rgb, load=load)
        segmenter = load(model)
        result = segmenter.segment_array(array, rgb=rgb, report=item.report, threshold=settings.threshold,
                                         sides=settings.sides, geometry=image_geometry(image, item.path))
        output.parent.mkdir(parents=True, exist_ok=True)
        card = segmenter.config.card
        write_mask(result.mask, image, output, segment_name=card.segment_name, color=card.segment_color)
        volume = image.GetDimension() == 3
        voxel_ml = math.prod(image.GetSpacing()) / 1000.0  # spacing in mm
        row.update(
            output=(item.stem + suffix), model=segmenter.config.name, report_source=result.report_source,
            similarity="" if result.similarity is None else f"{result.similarity:.4f}",
            in_domain="" if result.in_domain is None else str(result.in_domain).lower(),
            report_warnings="; ".join(result.report_warnings),  # sides only, never the report's words
            foreground_fraction=f"{result.foreground_fraction:.6f}",
            volume_ml=f"{int(result.mask.sum()) * voxel_ml:.3f}" if volume else "")
        if settings.save_reports:
            row[REPORT_COLUMN] = result.report
    except LgsegError as exc:
        row["error"] = _one_line(str(exc))
    except Exception as exc:  # noqa: BLE001 - one input's failure must not stop the batch; it is in its row
        row["error"] = _one_line(f"unexpected {exc.__class__.__name__}: {exc}")
    row["seconds"] = f"{time.perf_counter() - started - loading[0]:.3f}"
    return row


def absolute_model(model: str) -> str:
    """A model given as a folder, as an absolute path (the workers may start elsewhere); a name, and ``auto`` (even
    beside a folder of that name, as for a single image), as it is."""
    if model != AUTO_MODEL and (os.sep in model or model.startswith(".") or Path(model).is_dir()):
        return str(Path(model).resolve())
    return model


def _model_label(model: str) -> str:
    """How results.csv names a model asked for by folder: the folder's name."""
    return Path(model).name if os.sep in model or Path(model).is_dir() else model


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


def failure_row(item: BatchItem, error: str) -> Row:
    """The row of an input that its worker could not answer (the worker stopped)."""
    row = {column: "" for column in COLUMNS}
    row.update(image=item.image, error=_one_line(error))
    return row


# ---------------------------------------------------------------------------------------------------------------
# The output folder: settings, results.csv, resume
# ---------------------------------------------------------------------------------------------------------------


def columns(settings: BatchSettings) -> tuple[str, ...]:
    """The columns of results.csv: :data:`COLUMNS`, and the report after report_source with ``save_reports``."""
    if not settings.save_reports:
        return COLUMNS
    at = COLUMNS.index("report_source") + 1
    return COLUMNS[:at] + (REPORT_COLUMN,) + COLUMNS[at:]


def prepare_output(settings: BatchSettings) -> None:
    """Create the output folder (and check it is writable) and record the batch's settings; a folder holding the
    results of other settings or another input is refused, so that a rerun never mixes masks of both."""
    folder = Path(settings.output_dir)
    if folder.exists() and not folder.is_dir():
        raise LgsegError(f"output '{folder}' is a file; for a folder or manifest input the output is a folder",
                         option="output")
    from .imageio import MASK_SUFFIXES

    if not folder.exists() and full_suffix(folder) in MASK_SUFFIXES:
        raise LgsegError(f"for a folder or manifest input the output is a folder, not a mask file like '{folder}'",
                         option="output")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LgsegError(f"cannot create output folder '{folder}' ({exc.strerror or exc.__class__.__name__}); "
                         "choose another output folder", option="output") from exc
    check_writable(folder / RESULTS_FILE)
    record, wanted = folder / SETTINGS_FILE, settings.recorded()
    if record.is_file():
        try:
            earlier = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = None
        if earlier != wanted:
            changed = [k for k in wanted if not isinstance(earlier, dict) or earlier.get(k) != wanted[k]]
            raise LgsegError(f"output folder '{folder}' holds the results of a batch with another "
                             f"{changed[0] if changed else 'setting'}; run it with the same input and settings to "
                             "continue it, or choose another output folder", option="output")
    elif (folder / RESULTS_FILE).exists():
        raise LgsegError(f"output folder '{folder}' already holds a {RESULTS_FILE} of something else; choose another "
                         "output folder", option="output")
    else:
        with atomic_path(record) as tmp:
            tmp.write_text(json.dumps(wanted, indent=1), encoding="utf-8")


def read_results(settings: BatchSettings) -> dict[tuple[str, str], Row]:
    """The rows of an earlier run whose input is done: no error and the mask is there; keyed by input and mask path
    without suffix (the key of :func:`item_key`)."""
    path = Path(settings.output_dir) / RESULTS_FILE
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LgsegError(f"cannot read '{path}' ({exc.__class__.__name__}) to continue the batch; delete it to "
                         "start again") from exc
    done = {}
    for row in rows:
        output = row.get("output") or ""
        if row.get("error") or not output or not (Path(settings.output_dir) / output).is_file():
            continue
        done[(row.get("image") or "", output[:-len(full_suffix(output))])] = {k: v or "" for k, v in row.items()}
    return done


def item_key(item: BatchItem) -> tuple[str, str]:
    """What identifies an input's row in results.csv: the image as named, and its mask's path without suffix."""
    return item.image, item.stem


def write_results(settings: BatchSettings, rows: Sequence[Row]) -> Path:
    """Write results.csv atomically: one row per input, in the inputs' order."""
    path = Path(settings.output_dir) / RESULTS_FILE
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=columns(settings), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Where the inputs are segmented
# ---------------------------------------------------------------------------------------------------------------


class Engine(Protocol):
    """Segments inputs somewhere (worker processes, a cluster); used from one thread."""

    @property
    def capacity(self) -> int:
        """How many inputs may be segmented at once (more are not submitted: Ctrl+C waits only for those)."""

    def submit(self, index: int, item: BatchItem) -> None:
        """Start segmenting input ``index``."""

    def finished(self, timeout: float) -> list[tuple[int, Row]]:
        """The inputs finished since the last call, with their rows; waits up to ``timeout`` s for one."""

    def close(self) -> None:
        """Stop the workers (what they run is lost; masks are written atomically)."""


def ignore_interrupts() -> None:
    """In a worker process the batch started: ignore Ctrl+C (SIGINT). The terminal sends it to every process of the
    command; the batch's own process then stops handing out inputs and waits for the images being segmented, which
    the workers finish instead of dying in the middle of one. A no-op off the main thread."""
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers() -> int:
    """One worker per core, at most 8 (each holds its models: a few hundred MB)."""
    return max(1, min(available_cores(), 8))


def worker_threads(workers: int) -> int:
    """The PyTorch threads of each of ``workers`` workers on this machine: the cores shared out among them, at most
    ``OMP_NUM_THREADS`` where it is set (on a machine busy with other work, fewer threads than cores are faster)."""
    threads = max(1, available_cores() // workers)
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    return min(threads, int(cap)) if cap.isdigit() and int(cap) >= 1 else threads


class LocalPool:
    """Worker processes on this machine (an :class:`Engine`), each loading a model once (:class:`ModelCache`) and
    using cores / workers threads (:func:`worker_threads`), so that the workers together use every core once. A
    worker that dies (e.g. killed for memory) fails its input, and another one takes its place."""

    def __init__(self, settings: BatchSettings, workers: int):
        if workers < 1:
            raise LgsegError(f"the number of workers must be at least 1, not {workers}", option="workers")
        import multiprocessing

        self._settings, self._count, self._threads = settings, workers, worker_threads(workers)
        self._context = multiprocessing.get_context("spawn")  # fork would copy the caller's threads and locks
        self._workers: list[tuple[Any, Connection]] = []
        self._busy: dict[int, tuple[int, BatchItem]] = {}  # worker slot -> the input it segments
        try:
            for _ in range(workers):
                self._workers.append(self._start())
        except BaseException:
            self.close()
            raise

    def _start(self) -> tuple[Any, Connection]:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=serve_items, args=(theirs, self._settings, self._threads),
                                        name="lgseg batch worker", daemon=True)
        process.start()
        theirs.close()  # the worker's end: when the worker dies, reading ours gives EOFError
        return process, ours

    @property
    def capacity(self) -> int:
        return self._count

    def _replace(self, slot: int) -> None:
        """A new worker in the place of the one in ``slot``, which has stopped."""
        process, connection = self._workers[slot]
        connection.close()
        process.join(5)
        self._workers[slot] = self._start()

    def submit(self, index: int, item: BatchItem) -> None:
        slot = next(s for s in range(len(self._workers)) if s not in self._busy)
        try:
            self._workers[slot][1].send((index, item))
        except OSError:  # the worker stopped while it waited (e.g. killed for memory): another takes its input
            self._replace(slot)
            self._workers[slot][1].send((index, item))
        self._busy[slot] = (index, item)

    def finished(self, timeout: float) -> list[tuple[int, Row]]:
        from multiprocessing.connection import wait

        ready = wait([self._workers[slot][1] for slot in self._busy], timeout) if self._busy else []
        rows = []
        for slot, (process, connection) in enumerate(self._workers):
            if connection not in ready or slot not in self._busy:
                continue
            index, item = self._busy[slot]
            try:
                index, row = connection.recv()
            except (EOFError, OSError):
                process.join(5)
                row = failure_row(item, f"the worker process segmenting it stopped (exit code {process.exitcode}; "
                                        "out of memory?); check the input, or use fewer workers")
                self._replace(slot)
            del self._busy[slot]
            rows.append((index, row))
        return rows

    def close(self) -> None:
        """Idle workers are told to stop; busy ones (a batch stopped at once) are stopped now: their inputs are lost,
        their masks complete or absent (a stopped worker removes the temporary file of the mask it was writing)."""
        for slot, (process, connection) in enumerate(self._workers):
            if slot in self._busy:
                process.terminate()
            else:
                with contextlib.suppress(OSError, ValueError):
                    connection.send(None)
        deadline = time.monotonic() + 10
        for process, connection in self._workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
            connection.close()
        self._workers, self._busy = [], {}


def _exit_on_terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def serve_items(connection: Connection, settings: BatchSettings, threads: int) -> None:
    """A worker process of :class:`LocalPool`: segment the inputs it is sent until it is sent None. This process is
    the batch's own, so it sets its thread count (:func:`worker_threads`), ignores Ctrl+C, and ends on SIGTERM
    (:meth:`LocalPool.close`) by SystemExit, which removes the temporary file of a mask being written."""
    ignore_interrupts()
    signal.signal(signal.SIGTERM, _exit_on_terminate)
    import torch

    from .runner import ModelCache

    torch.set_num_threads(threads)
    models = ModelCache()
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return  # the batch stopped
        if message is None:
            return
        index, item = message
        connection.send((index, segment_item(item, settings, models)))


# ---------------------------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------------------------


class Progress(Protocol):
    """What the batch tells its front end: progress, and each failed input."""

    def __call__(self, done: int, total: int, failed: int) -> None: ...

    def failure(self, image: str, error: str) -> None: ...

    def note(self, text: str) -> None: ...


class ProgressBar:
    """The batch's one progress bar on stderr (tqdm, as lgseg's other bars): inputs done of all, the ETA and the
    failures; each failed input is one ``error:`` line above it. ``enabled`` False: only those lines."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar: Optional[Any] = None

    def __call__(self, done: int, total: int, failed: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            # initial: inputs done by an earlier run, so the ETA counts only this run's speed
            self.bar = tqdm(total=total, initial=done, desc="segmenting", unit="image", file=sys.stderr,
                            leave=False, dynamic_ncols=True)
        self.bar.set_postfix_str(f"{failed} failed", refresh=False)
        self.bar.update(done - self.bar.n)

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def failure(self, image: str, error: str) -> None:
        self._write(f"error: {image}: {error}")

    def note(self, text: str) -> None:
        self._write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Interrupts:
    """Ctrl+C (SIGINT) while a batch runs: the first one asks it to stop once the images being segmented are done
    (:attr:`requested`), a second one stops it at once (KeyboardInterrupt). Catching the signal, instead of a
    KeyboardInterrupt that may land between receiving an image's row and recording it, loses no row. The handler is
    installed only from the main thread and only for the batch's duration (:meth:`installed` puts the previous one
    back), and not where Ctrl+C is ignored (a job started in the background)."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread() \
                or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def run_batch(settings: BatchSettings, items: Sequence[BatchItem], start_engine: Callable[[], Engine],
              progress: Optional[Progress] = None) -> BatchSummary:
    """Segment the inputs not done by an earlier run into ``settings.output_dir`` and keep results.csv complete.

    The first Ctrl+C stops handing out inputs and waits for those being segmented (``summary.interrupted``); a
    second one stops at once (KeyboardInterrupt, raised; see :class:`Interrupts`). The engine is started only when
    there is work.
    """
    started = time.perf_counter()
    summary = BatchSummary(inputs=len(items), results=str(Path(settings.output_dir) / RESULTS_FILE))
    earlier = read_results(settings)
    rows: list[Optional[Row]] = [earlier.get(item_key(item)) for item in items]
    pending = deque(i for i, row in enumerate(rows) if row is None)
    summary.skipped = len(items) - len(pending)

    def save() -> None:
        write_results(settings, [row for row in rows if row is not None])

    def record(index: int, row: Row) -> None:
        rows[index] = row
        if row["error"]:
            summary.failed += 1
            if progress is not None:
                progress.failure(row["image"], row["error"])
        else:
            summary.done += 1

    def report() -> None:
        if progress is not None:
            progress(summary.skipped + summary.done + summary.failed, summary.inputs, summary.failed)

    report()
    interrupts = Interrupts()
    engine: Optional[Engine] = None
    try:
        with interrupts.installed():
            engine = start_engine() if pending else None
            running, last_saved = 0, time.monotonic()
            while engine is not None and (pending or running):
                if interrupts.requested and not summary.interrupted:
                    summary.interrupted = True
                    if progress is not None:
                        progress.note(f"stopping after the {running} image(s) being segmented (Ctrl+C again: at once)")
                if summary.interrupted and not running:
                    break
                while pending and not summary.interrupted and running < engine.capacity:
                    index = pending.popleft()
                    engine.submit(index, items[index])
                    running += 1
                for index, row in engine.finished(0.5):
                    running -= 1
                    record(index, row)
                    report()
                if time.monotonic() - last_saved > SAVE_EVERY_S:
                    save()
                    last_saved = time.monotonic()
    finally:
        save()
        if engine is not None:
            engine.close()
        summary.seconds = time.perf_counter() - started
    return summary
