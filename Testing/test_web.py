"""The web page (``lgseg serve``) end to end: a real server process, a real headless Chromium, the shipped model.

Each browser test starts its own server on a free port (``--port 0``; the address is read from what the server
prints), waits on conditions (status text, rendered views, pixels of the page), never on fixed sleeps, and stops
its server by its process id. Nothing is sent to any address outside 127.0.0.0/8.

The browser is Debian's ``chromium-headless-shell`` driven by Playwright's Python API (``.ci/run`` installs both;
``LGSEG_CHROMIUM`` names another build). Set ``LGSEG_WEB_SCREENSHOT=path.png`` to keep the page's screenshot after a
segmentation (``docs/web.md`` shows one taken this way).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATA_ROOT

pytest.importorskip("trame_slicer", reason="the web page needs the web extra: pip install '.[web]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (the web extra)")
CHROMIUM = Path(os.environ.get("LGSEG_CHROMIUM", "/usr/lib/chromium/chromium-headless-shell"))
if not CHROMIUM.is_file():
    pytest.skip(f"no headless Chromium at {CHROMIUM}: apt-get install chromium-headless-shell (or set LGSEG_CHROMIUM)",
                allow_module_level=True)

from languageguidedseg.web.access import is_loopback, parse_size, resolve_token  # noqa: E402
from languageguidedseg.web.uploads import safe_name  # noqa: E402

QATA = DATA_ROOT / "qata-cov19"
KVASIR = DATA_ROOT / "kvasir-seg"
CT = DATA_ROOT / "ct-examples" / "ct.nii.gz"
DICOM = DATA_ROOT / "ct-examples" / "ct-dicom"
# QaTa-COV19 validation images. The second one's mask follows the side a report names clearly (checked with the
# shipped model: "lower left lung" in the data set's image convention lies wholly in the image's left half, "lower
# right lung" wholly in the right half).
APPROXIMATION_IMAGE = "covid_0004"
SIDES_IMAGE = "cxr_s11479-e26259-r1"
LEFT = "unilateral pulmonary infection, one infected area, lower left lung."
START_TIMEOUT = 120  # seconds; a busy 2-core machine imports VTK, MRML and trame slowly
RUN_TIMEOUT = 180 * 1000  # milliseconds: model load plus a run on a busy CPU


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found (the tests read ../shared/data beside the checkout)")
    return path


def _qata_image(name: str) -> Path:
    return _need(QATA / "images" / f"{name}.png")


# ----------------------------------------------------------------------------------------------------------------
# A server process and a browser
# ----------------------------------------------------------------------------------------------------------------


class WebServer:
    """``lgseg serve ARGS --port 0`` as a subprocess; its address and upload folder read from its output."""

    def __init__(self, tmp_path: Path, *args: str):
        self.log = tmp_path / "server.log"
        env = dict(os.environ, LGSEG_MODELS=str(tmp_path / "no-user-models"), PYTHONUNBUFFERED="1")
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "languageguidedseg.cli", "serve", *args, "--port", "0"],
            stdout=subprocess.PIPE, stderr=self._log_file, text=True, env=env)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.url = self._wait_for(r"open (http://127\.0\.0\.1:\d+/\S*)")
            self.uploads = Path(self._wait_for(r"kept in (\S+) until the server stops"))
        except BaseException:
            self.stop()  # a server that did not start as expected is not left running (the fixture never sees it)
            raise

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)

    def _wait_for(self, pattern: str) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            match = re.search(pattern, line)
            if match:
                return match.group(1)
        raise AssertionError(f"the server did not print /{pattern}/; its log:\n{self.tail()}")

    @property
    def base(self) -> str:
        return self.url.split("?")[0]

    def tail(self, lines: int = 30) -> str:
        self._log_file.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        """SIGTERM to the server's process id; it removes its upload folder and exits."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self._log_file.close()
        return self.process.returncode


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(*args: str) -> WebServer:
        server = WebServer(tmp_path, *(str(a) for a in args))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    yield page
    context.close()


def wait_until(condition: Callable[[], object], timeout: float, what: str, server: Optional[WebServer] = None):
    """Poll ``condition`` until it returns something truthy (it may take screenshots, so poll gently)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            log = f"; server log:\n{server.tail()}" if server else ""
            raise AssertionError(f"timed out waiting for {what}{log}")
        time.sleep(0.2)


def open_page(page, server: WebServer, status: str):
    page.goto(server.url)
    page.wait_for_function("(text) => (document.querySelector('#lg-status')?.innerText || '').includes(text)",
                           arg=status, timeout=RUN_TIMEOUT)


def status(page) -> str:
    return page.inner_text("#lg-status")


def views(page, tmp_path: Path) -> np.ndarray:
    """The slice views as the page shows them: an RGB screenshot of the views' area."""
    path = tmp_path / "views.png"
    page.locator("#lg-views").screenshot(path=str(path))
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[..., :3].astype(int)


def overlay(rgb: np.ndarray) -> np.ndarray:
    """Pixels tinted by the (red) segment over the grey image."""
    return (rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2])) > 40


def segment_summary(page) -> dict:
    element = page.locator("#lg-segment-summary")
    return {key: element.get_attribute(f"data-{key}") for key in ("name", "color", "voxels", "sha256")}


def model_selection(page) -> str:
    """What the model selector shows."""
    return page.inner_text(".v-select:has(#lg-model) .v-select__selection-text")


def warnings_shown(page) -> str:
    """The warnings beside the report box ("" when none is shown)."""
    return page.inner_text("#lg-warnings") if page.locator("#lg-warnings").count() else ""


def choose_files(page, button: str, files) -> None:
    """Click a visible upload button and answer the browser's file chooser with ``files`` (a file, or a folder for
    the folder button), as a person does."""
    with page.expect_file_chooser(timeout=30000) as chooser:
        page.click(button)
    chooser.value.set_files(files)


def view_text(page, view: str, part: str) -> str:
    """Text of the overlay of slice view ``view`` ("Red" = axial or the 2D image): ``name``, ``slice``,
    ``letter-left`` ... ``letter-bottom``, or "" when that part is not shown."""
    element = page.locator(f".lg-overlay-{view} .lg-{'view-' if not part.startswith('letter') else ''}{part}")
    return element.inner_text().strip() if element.count() else ""


def letters(page, view: str) -> tuple[str, ...]:
    return tuple(view_text(page, view, f"letter-{edge}") for edge in ("left", "right", "top", "bottom"))


def mask_digest(mask: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(mask != 0, dtype=np.uint8).tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Browser tests
# ----------------------------------------------------------------------------------------------------------------


def test_empty_report_is_approximated_and_the_segment_appears_and_downloads(serve, page, tmp_path):
    """Issue tests 1 and 5: approximation marked as such, overlay in the view, .seg.nrrd download = server node."""
    server = serve(_qata_image(APPROXIMATION_IMAGE))
    started = time.perf_counter()
    open_page(page, server, "224 x 224 image")
    wait_until(lambda: views(page, tmp_path).std() > 20, 60, "the X-ray in the slice view", server)
    assert page.input_value("#lg-report") == ""
    assert overlay(views(page, tmp_path)).sum() < 50
    # A PNG carries no orientation: the page says what it assumes about left and right.
    assert page.inner_text("#lg-sides-label") == "Left/right: patient (assumed: radiological display)"

    page.click("#lg-segment")
    page.wait_for_selector("#lg-segment-summary", timeout=RUN_TIMEOUT)
    report = page.input_value("#lg-report")
    assert report.strip(), "the report box was not filled with the approximation"
    assert re.search(r"Approximated from the image \(prototype similarity 0\.\d\d: how close the nearest of the "
                     r"model's prototype reports is, not a confidence\)", page.inner_text("#lg-report-status"))
    # The default model, "auto", chose the chest X-ray model for the X-ray; the selector says so.
    assert model_selection(page) == "Automatic (qata-cxr)"
    assert page.locator("#lg-warnings").count() == 0
    summary = segment_summary(page)
    assert int(summary["voxels"]) > 100
    # The overlay in the browser: the red segment over the grey X-ray.
    wait_until(lambda: overlay(views(page, tmp_path)).sum() > 500, 60, "the segment overlay in the view", server)
    if os.environ.get("LGSEG_WEB_SCREENSHOT"):
        page.screenshot(path=os.environ["LGSEG_WEB_SCREENSHOT"])
    # Segment opacity 0 hides the overlay, 1 brings it back (the slider, moved with the keyboard).
    thumb = page.locator(".v-slider:has(#lg-opacity) [role=slider]")
    thumb.focus()
    page.keyboard.press("Home")
    wait_until(lambda: overlay(views(page, tmp_path)).sum() < 50, 60, "the overlay to vanish at opacity 0", server)
    page.keyboard.press("End")
    wait_until(lambda: overlay(views(page, tmp_path)).sum() > 500, 60, "the overlay at opacity 1", server)

    # Download through the page and read it back with slicerio: name, colour and voxels of the server's node.
    import slicerio

    with page.expect_download() as download:
        page.click("#lg-download-seg-nrrd")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name.endswith(".seg.nrrd")
    segmentation = slicerio.read_segmentation(str(saved))
    (segment,) = segmentation["segments"]
    assert segment["name"] == summary["name"]
    assert "#" + "".join(f"{round(255 * c):02x}" for c in segment["color"]) == summary["color"]
    voxels = np.transpose(slicerio.segment_mask(segmentation, segment))  # (i, j, k) -> (k, j, i)
    assert int(np.count_nonzero(voxels)) == int(summary["voxels"])
    assert mask_digest(voxels) == summary["sha256"]

    for button, suffix in (("#lg-download-png", ".png"), ("#lg-download-nii-gz", ".nii.gz")):
        with page.expect_download() as download:
            page.click(button)
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
        assert saved.name.endswith(suffix)
        assert mask_digest(sitk.GetArrayFromImage(sitk.ReadImage(str(saved))).reshape(voxels.shape)) == \
            summary["sha256"]
    print(f"approximation, overlay and downloads: {time.perf_counter() - started:.1f} s")


def _overlay_side(page, tmp_path: Path) -> Optional[float]:
    """Fraction of the overlay in the left half of the view (the image is centred in it); None without overlay."""
    tinted = overlay(views(page, tmp_path))
    if tinted.sum() < 200:
        return None
    columns = np.nonzero(tinted)[1]
    return float((columns < tinted.shape[1] / 2).mean())


def _summary_changed(page, old: str) -> None:
    page.wait_for_function("(old) => document.querySelector('#lg-segment-summary')?.dataset.sha256 !== old",
                           arg=old, timeout=RUN_TIMEOUT)


def _settled_segment(page, server: WebServer, quiet: float = 1.5) -> str:
    """The segment's SHA-256 once no run has changed it for ``quiet`` seconds and the page is not busy (a live
    update may still follow the keystroke that made the last change)."""
    seen = {"sha": None, "since": time.monotonic()}

    def settled() -> Optional[str]:
        sha = segment_summary(page)["sha256"]
        if sha != seen["sha"] or page.locator("#lg-segment").is_disabled():
            seen.update(sha=sha, since=time.monotonic())
            return None
        return sha if time.monotonic() - seen["since"] >= quiet else None
    return wait_until(settled, 120, "the segment to settle", server)


def _overlay_in(page, tmp_path: Path, server: WebServer, half: str) -> float:
    """Wait until more than 90% of the overlay lies in the image's ``half`` ("left" or "right"); that share."""
    def share() -> Optional[float]:
        left = _overlay_side(page, tmp_path)
        if left is None:
            return None
        value = left if half == "left" else 1 - left
        return value if value > 0.9 else None
    return wait_until(share, 60, f"the overlay in the image's {half} half", server)


def test_keyboard_and_mouse_walk_the_report_loop(serve, page, tmp_path):
    """Issue 27: the whole loop by keyboard and mouse only. A report pasted and Enter; an edit by keys moves the mask
    (live); the sides switch and the model selector re-run it as typing does; Undo restores the segment before.
    Also issue test 2: the side a report names is where the mask lies."""
    server = serve(_qata_image(SIDES_IMAGE))
    started = time.perf_counter()
    open_page(page, server, "224 x 224 image")
    # A 2D image: one view named "Image", the sides assumed for a PNG at its edges, no slice number, no slider.
    assert view_text(page, "Red", "name") == "Image" and view_text(page, "Red", "slice") == ""
    assert letters(page, "Red") == ("R", "L", "", "")
    assert page.locator(".lg-slice-slider").count() == 0
    # The reports below are in the data set's convention: the sides of the image as displayed.
    page.click("#lg-sides-image")
    page.wait_for_function("document.querySelector('#lg-sides-label').innerText.includes('image')")

    page.click("#lg-report")
    page.keyboard.insert_text(LEFT)  # as a paste
    page.keyboard.press("Enter")  # segments; no new line in the box
    page.wait_for_selector("#lg-segment-summary", timeout=RUN_TIMEOUT)
    assert page.input_value("#lg-report") == LEFT
    _overlay_in(page, tmp_path, server, "left")
    page.wait_for_function("document.querySelector('#lg-report-status').innerText === "
                           "'Segment uses this report as written.'", timeout=RUN_TIMEOUT)
    # A 2D PNG has no pixel spacing: the size is in pixels, with the share of the image.
    assert re.fullmatch(r"Segment 'Infection': \d+ pixels \(\d+\.\d% of the image; the file gives no pixel "
                        r"spacing\)", page.inner_text("#lg-segment-summary"))
    left = _settled_segment(page, server)

    # Edit with the keys, no button: "left" deleted, "right" typed; the live update moves the mask.
    page.keyboard.press("End")
    for _ in range(len(" lung.")):
        page.keyboard.press("ArrowLeft")
    for _ in range(len("left")):
        page.keyboard.press("Backspace")
    page.keyboard.type("right", delay=50)
    _summary_changed(page, left)
    _overlay_in(page, tmp_path, server, "right")
    right = _settled_segment(page, server)

    # The sides switch re-runs as typing does: in the patient's sides, "lower right lung" of a PNG (radiological
    # display assumed) is the lung on the image's left.
    page.click("#lg-sides-patient")
    _summary_changed(page, right)
    _overlay_in(page, tmp_path, server, "left")

    # Undo: the segment as it was before the last segmentation, the right half; only once.
    page.click("#lg-undo")
    page.wait_for_function("(sha) => document.querySelector('#lg-segment-summary')?.dataset.sha256 === sha",
                           arg=right, timeout=RUN_TIMEOUT)
    _overlay_in(page, tmp_path, server, "right")
    assert page.locator("#lg-undo").is_disabled()

    # The model selector re-runs too: the polyp model, given a chest X-ray, warns beside the box at once.
    page.click(".v-select:has(#lg-model)")
    page.click(".v-overlay .v-list-item:has-text('kvasir-polyp')")
    wait_until(lambda: "kvasir-polyp was trained on" in warnings_shown(page), 120, "the polyp model's warning", server)
    log = server.log.read_text(errors="replace")
    assert "lower left lung" not in log and "lower right lung" not in log, "the server logged a report"
    print(f"keyboard and mouse walk: {time.perf_counter() - started:.1f} s")


def test_cancel_on_a_volume_leaves_the_scene_unchanged(serve, page, tmp_path):
    """Issue test 3: whole-volume mode, Cancel during the run: the segment stays as it was and the page says so."""
    # The real CT with its 30 slices interpolated to 240, so that even a fast machine is still segmenting when the
    # page's Cancel arrives (a slow one waits only for the batch that is running).
    ct = sitk.ReadImage(str(_need(CT)))
    spacing = (ct.GetSpacing()[0], ct.GetSpacing()[1], ct.GetSpacing()[2] / 8)
    size = (ct.GetSize()[0], ct.GetSize()[1], ct.GetSize()[2] * 8)
    volume = tmp_path / "ct-240.nii.gz"
    sitk.WriteImage(sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing,
                                  ct.GetDirection(), 0, ct.GetPixelID()), str(volume))
    # The chest X-ray model, chosen explicitly (no installed model is made for a CT: "auto" would refuse it).
    server = serve(volume, "--model", "qata-cxr")
    started = time.perf_counter()
    open_page(page, server, "122 x 101 x 240 volume")
    wait_until(lambda: page.locator("#lg-views img").count() == 3, 60, "three slice views", server)
    assert page.inner_text("#lg-sides-label") == "Left/right: patient (image orientation from the volume)"
    assert model_selection(page) == "qata-cxr"

    # The viewer: each view's name, its slice out of the total and the patient directions at its edges.
    assert [view_text(page, view, "name") for view in ("Red", "Green", "Yellow")] == ["Axial", "Coronal", "Sagittal"]
    assert re.fullmatch(r"slice \d+ / 240", view_text(page, "Red", "slice"))
    assert re.fullmatch(r"slice \d+ / 101", view_text(page, "Green", "slice"))  # the CT's 101 rows
    assert letters(page, "Red") == ("R", "L", "A", "P")
    assert letters(page, "Green") == ("R", "L", "S", "I")
    assert letters(page, "Yellow") == ("A", "P", "S", "I")
    # Window/level: a CT gets the CT presets; a preset, a drag in the view and Reset each change what is shown.
    window = page.locator(".lg-overlay-Red .lg-view-window")
    opened = window.inner_text()
    assert re.fullmatch(r"W \d+ L -?\d+", opened)
    page.click("#lg-window-lung")
    wait_until(lambda: window.inner_text() == "W 1400 L -500", 30, "the lung window", server)
    before_drag = views(page, tmp_path)
    box = page.locator("#lg-views img").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 + 80, box["y"] + box["height"] / 2 + 60, steps=8)
    page.mouse.up()
    wait_until(lambda: window.inner_text() != "W 1400 L -500", 30, "the window dragged", server)
    wait_until(lambda: np.abs(views(page, tmp_path) - before_drag).mean() > 1, 30, "the views redrawn", server)
    page.click("#lg-window-reset")
    wait_until(lambda: window.inner_text() == opened, 30, "the window it opened with", server)

    # A CT slice is not a chest X-ray: no report approximated, nothing segmented, the warning beside the report box.
    page.click("#lg-scope-slice")
    page.click("#lg-segment")
    page.wait_for_selector("#lg-segment-anyway", timeout=RUN_TIMEOUT)
    assert "this image does not look like a frontal chest X-ray (the images qata-cxr was trained on)" in \
        warnings_shown(page)
    assert page.input_value("#lg-report") == "" and page.locator("#lg-segment-summary").count() == 0
    assert page.inner_text("#lg-report-status").startswith("No report approximated: this image does not look like")
    assert status(page).startswith("Nothing was segmented")
    # "Segment anyway": the mask, still without a report in the box, the warning kept.
    page.click("#lg-segment-anyway")
    page.wait_for_selector("#lg-segment-summary", timeout=RUN_TIMEOUT)
    assert page.input_value("#lg-report") == "" and page.locator("#lg-segment-anyway").count() == 0
    assert "does not look like a frontal chest X-ray" in warnings_shown(page)
    assert re.search(r"^Done .* guided by the image alone: .* of slice \d+ ", status(page))
    # Its size in a clinician's units: mm² and share of the slice segmented, ml and share of the volume.
    assert re.fullmatch(r"Segment 'Infection': slice \d+: \d+ mm² \(\d+\.\d% of the slice\); whole segment: "
                        r"\d+\.\d ml \(\d+\.\d\d% of the volume\)", page.inner_text("#lg-segment-summary"))
    before = segment_summary(page)
    # Scrolling the axial view runs again for the new slice: held back again (no report), the segment kept.
    shown_slice = view_text(page, "Red", "slice")
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(3):
        page.mouse.wheel(0, 120)
    page.wait_for_selector("#lg-segment-anyway", timeout=RUN_TIMEOUT)
    assert status(page).startswith("Nothing was segmented") and segment_summary(page) == before
    assert view_text(page, "Red", "slice") != shown_slice

    page.click("#lg-scope-volume")
    page.click("#lg-segment")
    page.wait_for_selector("#lg-cancel", timeout=RUN_TIMEOUT)
    page.wait_for_function("document.querySelector('#lg-status').innerText.includes('Segmenting slice')",
                           timeout=RUN_TIMEOUT)
    page.keyboard.press("Escape")  # as the Cancel button shown beside Segment
    page.wait_for_function("document.querySelector('#lg-status').innerText.includes('Cancelled')",
                           timeout=RUN_TIMEOUT)
    assert "the scene was not changed" in status(page)
    assert page.locator("#lg-cancel").count() == 0
    assert segment_summary(page) == before  # the server's node, read back after the cancel
    print(f"volume cancel: {time.perf_counter() - started:.1f} s")


def _kvasir_frame() -> Path:
    from languageguidedseg.data import load_split

    return load_split(_need(KVASIR), "val", validate=False)[0].image_path


def test_auto_chooses_the_polyp_model_and_the_chest_model_warns_on_a_colonoscopy_frame(serve, page, tmp_path):
    """Issue 25: the default model "auto" picks the model made for the image and the selector shows it; the chest
    X-ray model chosen explicitly warns beside the report box and puts no approximated report in it."""
    server = serve(_kvasir_frame())
    open_page(page, server, "image. Type a report")
    assert model_selection(page) == "Automatic"
    assert letters(page, "Red") == ("", "", "", "")  # a colour frame has no patient sides to show
    page.click("#lg-segment")
    page.wait_for_selector("#lg-segment-summary", timeout=RUN_TIMEOUT)
    wait_until(lambda: model_selection(page) == "Automatic (kvasir-polyp)", 30, "the model chosen", server)
    assert page.input_value("#lg-report").strip() and warnings_shown(page) == ""
    before = segment_summary(page)

    page.click(".v-select:has(#lg-model)")
    page.click(".v-overlay .v-list-item:has-text('qata-cxr')")
    wait_until(lambda: model_selection(page) == "qata-cxr", 30, "qata-cxr selected", server)
    page.click("#lg-segment")
    page.wait_for_selector("#lg-segment-anyway", timeout=RUN_TIMEOUT)
    assert warnings_shown(page).startswith(
        "this image does not look like a frontal chest X-ray (the images qata-cxr was trained on); its mask and "
        "approximated report are unreliable")
    # The polyp model's approximation is taken out of the box, and none of the chest model's is put in; the segment
    # stays as it was.
    assert page.input_value("#lg-report") == "" and segment_summary(page) == before
    assert page.locator("[role=dialog]").count() == 0  # shown beside the box, not as a dialog


def test_bad_uploads_give_one_message_and_a_good_one_works(serve, page, tmp_path):
    """Issue test 4 (and a 4D image, 64-bit integers, a DICOM folder): one error in the page, nothing kept, the
    server goes on."""
    not_an_image = tmp_path / "report.png"
    not_an_image.write_text("this is a text file, not a PNG\n")
    four_d = tmp_path / "four.nrrd"
    sitk.WriteImage(sitk.JoinSeries([sitk.Image([4, 5, 3], sitk.sitkInt16)] * 2), str(four_d))
    server = serve()
    open_page(page, server, "Open an image")
    # Other sites in the browser, and other names rebound to 127.0.0.1, get nothing (they do not hold the token).
    ws = server.base.replace("http://", "ws://") + "ws"
    assert _websocket(ws, origin="http://elsewhere.example") == 403
    assert _get(server.base, headers={"Host": "elsewhere.example"}) == (403, b"")
    assert _post(server.base + "upload", b"x", headers={"Origin": "http://elsewhere.example"})[0] == 403
    assert list(server.uploads.iterdir()) == []

    for upload, message in ((not_an_image, "cannot read"), (four_d, "4D images are not supported")):
        choose_files(page, "#lg-upload-button", str(upload))
        page.wait_for_selector("#lg-error", timeout=60000)
        assert page.locator("#lg-error").count() == 1
        assert message in page.inner_text("#lg-error")
        assert "Traceback" not in page.content()
        assert list(server.uploads.iterdir()) == []  # nothing of a failed upload is kept
        page.click("#lg-error button")  # dismiss

    choose_files(page, "#lg-upload-button", str(_qata_image(APPROXIMATION_IMAGE)))
    page.wait_for_function("document.querySelector('#lg-status').innerText.includes('224 x 224 image')",
                           timeout=60000)
    assert page.locator("#lg-error").count() == 0
    wait_until(lambda: views(page, tmp_path).std() > 20, 60, "the uploaded X-ray in the view", server)
    # The upload is in the Image list, shown as the image open.
    assert page.inner_text(".v-select:has(#lg-file) .v-select__selection-text") == \
        f"{APPROXIMATION_IMAGE}.png (uploaded)"

    # 64-bit integers, which the slice views cannot show: refused where a value needs 64 bits, else shown as 32-bit
    # integers with a note that says so.
    wide, counts = tmp_path / "wide.nrrd", tmp_path / "counts.nrrd"
    values = np.arange(16 * 16 * 4, dtype=np.uint64).reshape(4, 16, 16)
    sitk.WriteImage(sitk.GetImageFromArray(values), str(counts))
    values[0, 0, 0] = 2 ** 40
    sitk.WriteImage(sitk.GetImageFromArray(values), str(wide))
    choose_files(page, "#lg-upload-button", str(wide))
    page.wait_for_selector("#lg-error", timeout=60000)
    assert "'wide.nrrd' has 64-bit unsigned integer voxels beyond the 32-bit range" in page.inner_text("#lg-error")
    page.click("#lg-error button")
    choose_files(page, "#lg-upload-button", str(counts))
    page.wait_for_function("document.querySelector('#lg-status').innerText.includes('16 x 16 x 4 volume')",
                           timeout=60000)
    assert "its 64-bit unsigned integer voxels are shown as 32-bit integers; every value fits, none is changed" \
        in status(page)
    assert page.locator("#lg-error").count() == 0

    # A DICOM folder (a 512 x 512 x 20 CT series), read as the series in it: three slice views.
    choose_files(page, "#lg-upload-folder-button", str(_need(DICOM)))
    page.wait_for_function("document.querySelector('#lg-status').innerText.includes('512 x 512 x 20 volume')",
                           timeout=60000)
    wait_until(lambda: page.locator("#lg-views img").count() == 3, 60, "three slice views", server)
    assert server.stop() == 0
    assert not server.uploads.exists(), "the upload folder was not removed at exit"


def _get(url: str, headers: Optional[dict] = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _websocket(url: str, cookie: Optional[str] = None, origin: Optional[str] = None) -> int:
    """HTTP status of a websocket handshake (101 = connected)."""
    import aiohttp

    async def connect() -> int:
        headers = {"Cookie": cookie} if cookie else {}
        if origin:
            headers["Origin"] = origin
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(url, headers=headers) as socket:
                    await socket.close()
                    return 101
            except aiohttp.WSServerHandshakeError as error:
                return error.status

    # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, connect()).result()


def _post(url: str, data: bytes, headers: Optional[dict] = None) -> tuple[int, bytes]:
    boundary = "lgsegboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_token_guards_page_websocket_and_uploads(serve, page, tmp_path):
    """Issue test 6: with a token required, requests without it get nothing; with it, the page works."""
    token = "T0ken-for-the-test-of-the-web-page"
    server = serve("--token", token, "--max-upload", "1kB")
    assert server.url == f"{server.base}?token={token}"
    base, ws = server.base, server.base.replace("http://", "ws://") + "ws"
    cookie = f"lgseg_token_{base.rstrip('/').rsplit(':', 1)[1]}={token}"  # the cookie of this server's port
    for path in ("", "index.html", "__lgseg/upload.js"):
        assert _get(base + path) == (403, b""), path
    assert _get(f"{base}?token=wrong-token") == (403, b"")
    assert _websocket(ws) == 403
    assert _websocket(f"{ws}?token=wrong-token") == 403
    assert _post(base + "upload", b"x" * 10)[0] == 403

    assert _websocket(f"{ws}?token={token}") == 101
    assert _websocket(ws, cookie=cookie) == 101
    # Another web site open in the same browser cannot use the cookie: its Origin is refused.
    assert _websocket(ws, cookie=cookie, origin="http://elsewhere.example") == 403
    assert _websocket(ws, cookie=cookie, origin=base.rstrip("/")) == 101
    code, body = _post(f"{base}upload?token={token}", b"x" * 4096)  # over --max-upload 1kB
    assert code == 413 and "larger than this server's limit of 1 kB" in json.loads(body)["error"]
    assert list(server.uploads.iterdir()) == []

    with urllib.request.urlopen(urllib.request.Request(base + "index.html",
                                                       headers={"Cookie": cookie})) as served:
        assert served.status == 200 and served.headers["X-Frame-Options"] == "DENY"  # no framing by other sites
        assert served.headers["Referrer-Policy"] == "no-referrer"

    response = page.goto(base)
    assert response.status == 403 and page.inner_text("body") == ""
    page.goto(server.url)  # the printed address: token traded for a cookie, then dropped from the address bar
    page.wait_for_function("(document.querySelector('#lg-status')?.innerText || '').includes('Open an image')",
                           timeout=60000)
    assert "token" not in page.url
    assert "larger than this server's limit of 1 kB" in page.inner_text("#lg-error")  # the refused upload, in words


# ----------------------------------------------------------------------------------------------------------------
# Plain functions
# ----------------------------------------------------------------------------------------------------------------


def test_access_rules():
    assert is_loopback("127.0.0.1") and is_loopback("127.3.2.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    assert resolve_token("127.0.0.1", None, no_token=True) is None  # the explicit opt-out, loopback only
    generated = resolve_token("127.0.0.1", None)  # a token on loopback too
    assert generated and len(generated) >= 43 and generated != resolve_token("0.0.0.0", None)
    assert resolve_token("127.0.0.1", "given-token-" + "x" * 20) == "given-token-" + "x" * 20
    for bad in ("short", "x" * 31, "has space " + "1" * 30, "semi;colon" + "1" * 30):
        with pytest.raises(Exception, match="--token"):
            resolve_token("127.0.0.1", bad)
    assert parse_size("2GB") == 2 * 1024 ** 3 and parse_size("500MB") == 500 * 1024 ** 2
    assert parse_size("1kB") == 1024 and parse_size("4096") == 4096
    for bad in ("", "lots", "-1MB", "0"):
        with pytest.raises(Exception, match="--max-upload"):
            parse_size(bad)
    assert safe_name("scan/series/IM0001", 0) == "IM0001"
    assert safe_name("../../etc/passwd", 3) == "passwd"
    assert safe_name("..", 4) == "file-4" and safe_name(".hidden", 5) == "file-5"


def test_viewer_letters_ct_and_sizes():
    from languageguidedseg.web.viewer import looks_like_ct, orientation_letters, segment_size

    # Slicer's default axial, coronal and sagittal SliceToRAS: (left, right, top, bottom) edges.
    axial = np.array([[-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    coronal = np.array([[-1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    sagittal = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    for matrix, expected in ((axial, "RLAP"), (coronal, "RLSI"), (sagittal, "APSI")):
        got = orientation_letters(matrix)
        assert "".join(got[edge] for edge in ("left", "right", "top", "bottom")) == expected
    assert looks_like_ct(-1024.0) and not looks_like_ct(0.0)

    image = np.zeros((10, 10), np.uint8)
    image[:1, :5] = 1
    assert segment_size(image, (2.0, 2.0), axis=2, slice_index=0, is_volume=False, has_spacing=True) == \
        "20 mm² (5.0% of the image)"
    assert segment_size(image, (1.0, 1.0), axis=2, slice_index=0, is_volume=False, has_spacing=False) == \
        "5 pixels (5.0% of the image; the file gives no pixel spacing)"
    volume = np.zeros((2, 10, 10), np.uint8)
    volume[1, :1, :] = 1  # k = 1: 10 voxels of 10 x 10 x 10 mm
    assert segment_size(volume, (10.0, 10.0, 10.0), axis=2, slice_index=1, is_volume=True, has_spacing=True) == \
        "slice 2: 1000 mm² (10.0% of the slice); whole segment: 10.0 ml (5.00% of the volume)"
    assert segment_size(volume, (10.0, 10.0, 10.0), axis=None, slice_index=None, is_volume=True,
                        has_spacing=True) == "whole segment: 10.0 ml (5.00% of the volume)"


def test_serve_refuses_bad_arguments_in_one_line(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with taken:
        for args, message in (([str(tmp_path / "missing.png")], "does not exist"),
                              (["--max-upload", "huge"], "--max-upload"),
                              (["--port", "70000"], "--port"),
                              (["--port", str(taken.getsockname()[1])], "in use"),
                              (["--host", "no-such-host.invalid"], "--host"),
                              (["--model", "no-such-model"], "unknown model")):
            result = subprocess.run([sys.executable, "-m", "languageguidedseg.cli", "serve", *args],
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 2, result.stderr
            assert result.stderr.startswith("error: ") and message in result.stderr
            assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_volume_node_from_the_engine_reader_matches_slicer_reader():
    """The page reads files with the engine's reader; the volume node must equal what Slicer's own reader makes,
    and remember its file (as Slicer's loaders do) so that a PNG is known to carry no orientation."""
    import slicer

    from languageguidedseg import mrml
    from languageguidedseg.imageio import read_image

    scene = slicer.vtkMRMLScene()
    path = _need(CT)
    ours = mrml.add_volume_node(scene, read_image(path), "ct", source=path)
    theirs = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(theirs)
    np.testing.assert_allclose(mrml.ijk_to_ras_matrix(ours), mrml.ijk_to_ras_matrix(theirs), atol=1e-6)
    np.testing.assert_array_equal(mrml.volume_array(ours)[0], mrml.volume_array(theirs)[0])
    assert ours.GetStorageNode().GetFileName() == str(path)
    # A PNG carries no orientation: left and right follow the radiological display assumption, and say so.
    png = _qata_image(APPROXIMATION_IMAGE)
    assert mrml.volume_geometry(mrml.add_volume_node(scene, read_image(png), "xray", source=png)) is None
