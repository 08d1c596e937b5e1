"""How live the web page's report loop feels: time from the last keystroke, and from one edit, to new overlay pixels.

    python Testing/web_latency.py [--image PNG] [--repeats N] [--chromium PATH]

Starts ``lgseg serve IMAGE --model qata-cxr --port 0``, opens it in Debian's headless Chromium (Playwright), segments
once with a report naming the lower left lung (in image sides), then alternates the report between "left" and
"right" and times, in the page's own clock (``performance.now()``), from the report box's last ``input`` event to
the first view image whose red overlay lies in the newly named half:

- ``keystroke_to_overlay_ms``: "left" deleted and "right" typed key by key (100 ms apart, a quick typist); from the
  last keystroke.
- ``edit_to_overlay_ms``: the whole report replaced in one edit (a paste).

Both include the page's pause-in-typing delay, the websocket round trips, the run, the render and the image
transfer. Prints one JSON object with the medians, every trial and the machine's CPU count. Needs the test tools
(``pip install ".[test,web]"``) and ``chromium-headless-shell``. The image is a QaTa-COV19 validation X-ray whose
mask follows the side its report names (as in ``test_web.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
IMAGE = DATA_ROOT / "qata-cov19" / "images" / "cxr_s11479-e26259-r1.png"
CHROMIUM = Path(os.environ.get("LGSEG_CHROMIUM", "/usr/lib/chromium/chromium-headless-shell"))
REPORT = "unilateral pulmonary infection, one infected area, lower {side} lung."
KEY_DELAY_MS = 100
TIMEOUT_S = 180

# In the page: the time of each input event in the report box, and of each view image loaded, with where its red
# overlay lies (the fraction of tinted pixels in the left half of the view). Installed before the page's scripts.
WATCH_OVERLAY = """
window.lgLatency = {inputs: [], frames: []};
document.addEventListener('input', (event) => {
  if (event.target.closest && event.target.closest('#lg-report')) { lgLatency.inputs.push(performance.now()); }
}, true);
const canvas = document.createElement('canvas');
document.addEventListener('load', (event) => {
  const img = event.target;
  if (img.tagName !== 'IMG' || !img.closest('#lg-views')) { return; }
  const time = performance.now();
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const context = canvas.getContext('2d', {willReadFrequently: true});
  context.drawImage(img, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let tinted = 0, left = 0;
  for (let i = 0; i < pixels.length; i += 4) {
    if (pixels[i] - Math.max(pixels[i + 1], pixels[i + 2]) > 40) {
      tinted += 1;
      if ((i / 4) % canvas.width < canvas.width / 2) { left += 1; }
    }
  }
  lgLatency.frames.push({time: time, tinted: tinted, left: tinted ? left / tinted : null});
}, true);
"""


def start_server(image: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``lgseg serve`` on a free port; its process and the address it printed."""
    with open(log, "w") as errors:  # the server writes into its own copy of the file descriptor
        process = subprocess.Popen([sys.executable, "-m", "languageguidedseg.cli", "serve", str(image), "--model",
                                    "qata-cxr", "--port", "0"], stdout=subprocess.PIPE, stderr=errors, text=True,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            match = re.search(r"open (http://127\.0\.0\.1:\d+/\S*)", lines.get(timeout=0.5))
        except queue.Empty:
            continue
        if match:
            return process, match.group(1)
    process.kill()
    process.wait()
    raise SystemExit(f"error: the server did not start; its log is {log}")


def wait_for_side(page: Any, side: str, after: float) -> float:
    """The page time of the first view image after ``after`` whose overlay lies in the ``side`` half."""
    page.wait_for_function(
        """([side, after]) => lgLatency.frames.some((f) => f.time > after && f.tinted > 200 &&
                                                    (side === 'left' ? f.left > 0.9 : f.left < 0.1))""",
        arg=[side, after], timeout=TIMEOUT_S * 1000)
    return page.evaluate(
        """([side, after]) => lgLatency.frames.find((f) => f.time > after && f.tinted > 200 &&
                                                    (side === 'left' ? f.left > 0.9 : f.left < 0.1)).time""",
        [side, after])


def measure(image: Path, repeats: int, chromium: Path) -> dict:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder:
        process, url = start_server(image, Path(folder) / "server.log")
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.add_init_script(WATCH_OVERLAY)
                page.goto(url)
                page.wait_for_function("(document.querySelector('#lg-status')?.innerText || '').includes('image.')",
                                       timeout=TIMEOUT_S * 1000)
                page.click("#lg-sides-image")  # the reports below name the sides of the image as displayed
                page.fill("#lg-report", REPORT.format(side="left"))
                page.click("#lg-segment")
                wait_for_side(page, "left", 0)
                keystroke, edit = [], []
                side = "left"
                for _ in range(repeats):
                    # Typed: put the caret after the side's word, delete it, type the other side's word.
                    new = "right" if side == "left" else "left"
                    page.click("#lg-report")
                    page.keyboard.press("End")
                    for _ in range(len(" lung.")):
                        page.keyboard.press("ArrowLeft")
                    for _ in range(len(side)):
                        page.keyboard.press("Backspace")
                    page.keyboard.type(new, delay=KEY_DELAY_MS)
                    last = page.evaluate("lgLatency.inputs[lgLatency.inputs.length - 1]")
                    keystroke.append(wait_for_side(page, new, last) - last)
                    side = new
                    # One edit: the whole report replaced at once.
                    new = "right" if side == "left" else "left"
                    page.wait_for_timeout(500)  # let the page settle: this edit is not queued behind the last
                    page.fill("#lg-report", REPORT.format(side=new))
                    last = page.evaluate("lgLatency.inputs[lgLatency.inputs.length - 1]")
                    edit.append(wait_for_side(page, new, last) - last)
                    side = new
                    page.wait_for_timeout(500)
                browser.close()
        finally:
            process.terminate()
            process.wait(timeout=60)
    return {"keystroke_to_overlay_ms": round(statistics.median(keystroke)),
            "edit_to_overlay_ms": round(statistics.median(edit)),
            "keystroke_trials_ms": [round(t) for t in keystroke], "edit_trials_ms": [round(t) for t in edit],
            "image": image.name, "cpus": os.cpu_count()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=IMAGE, help="a 2D chest X-ray (default: a QaTa-COV19 val image)")
    parser.add_argument("--repeats", type=int, default=5, help="trials of each kind (default 5)")
    parser.add_argument("--chromium", type=Path, default=CHROMIUM, help="headless Chromium to drive")
    args = parser.parse_args()
    for path, what in ((args.image, "image"), (args.chromium, "headless Chromium")):
        if not path.is_file():
            print(f"error: {what} {path} not found", file=sys.stderr)
            return 2
    print(json.dumps(measure(args.image, args.repeats, args.chromium)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
