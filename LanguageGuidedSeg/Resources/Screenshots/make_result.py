"""Make the result picture of docs/slicer.md: report edits moving the mask between zones and sides, through the MRML
bridge as the module runs.

A chest X-ray is loaded into a volume node with Slicer's own reader and segmented five times into the same
segmentation node, as a clinician would in the module (left/right = the patient's sides, the module's default): no
report (the approximation), the case's own report, then the report edited to name only the upper zone of the
patient's left lung, only its lower zone, and only the right lung. The segment is read back from the node each time.
The example is the bilateral validation case (among the first ``--count`` whose report names all of the patient's
left lung) whose zone steering (share of the segment above the left lesion's mid-height with the "upper" edit minus
that with the "lower" edit, as ``lgseg evaluate``'s zone_steering) is closest to the median: a typical case, not the
best one.

Usage (from the repository root, with slicer-core and matplotlib installed)::

    PYTHONPATH=Logic python LanguageGuidedSeg/Resources/Screenshots/make_result.py qata-cxr \\
        LanguageGuidedSeg/Resources/Screenshots/result.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
import textwrap
from pathlib import Path
from typing import Optional

import matplotlib
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import slicer  # noqa: E402

from languageguidedseg import mrml  # noqa: E402
from languageguidedseg.inference import Segmenter  # noqa: E402
from languageguidedseg.laterality import left_share, report_laterality  # noqa: E402
from languageguidedseg.probes import ZONE_REPORT, mid_height, share_above, whole_sides  # noqa: E402
from languageguidedseg.sides import RADIOLOGICAL_DISPLAY, translate_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT.parent / "shared" / "data" / "qata-cov19"
# What a clinician types to keep one zone of the patient's left lung, or the right lung (the patient's sides, the
# module's default); the zone reports are those of lgseg evaluate's zone-steering probe.
EDITS = {"upper": ZONE_REPORT.format(zone="upper", side="left"), "lower": ZONE_REPORT.format(zone="lower", side="left"),
         "right": "unilateral pulmonary infection, one infected area, middle lower right lung."}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a != 0, b != 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def patient_left_share(mask: np.ndarray) -> float:
    """Share of the mask on the patient's left: the image's right half (a radiograph in radiological display,
    which is how Slicer shows a PNG: its columns run towards the patient's left)."""
    share = left_share(mask)
    return 0.5 if np.isnan(share) else 1.0 - share


def right_half(mask: np.ndarray) -> np.ndarray:
    """The image's right half (the patient's left) as a boolean mask of ``mask``'s shape."""
    half = np.zeros(mask.shape, dtype=bool)
    half[:, mask.shape[1] // 2:] = True
    return half


def segment_case(image_id: str, segmenter: Segmenter, folder: Path) -> Optional[dict]:
    scene = slicer.vtkMRMLScene()
    nrrd = folder / f"{image_id}.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(next((DATA / "images").glob(f"{image_id}.*")))), str(nrrd))
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", image_id)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(nrrd))
    volume.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(volume):
        raise RuntimeError(f"cannot read {nrrd}")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    # The data set's reports name the image's sides; typed into the module they read as the patient's.
    own = (DATA / "reports" / f"{image_id}.txt").read_text(encoding="utf-8").strip()
    own = translate_report(own, "image", "patient", RADIOLOGICAL_DISPLAY)
    panels = []
    for title, report in (("No report: approximated", None), ("The case's report", own),
                          ("Edited: upper left lung", EDITS["upper"]), ("Edited: lower left lung", EDITS["lower"]),
                          ("Edited: the right lung", EDITS["right"])):
        result = mrml.segment_volume_node(volume, segmentation, report=report, model=segmenter)
        mask = mrml.segment_mask(segmentation, result.segment_id, volume)[0]
        panels.append(dict(title=title, mask=mask, result=result))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "masks" / f"{image_id}.png"))) > 127
    segment = segmentation.GetSegmentation().GetSegment(panels[0]["result"].segment_id)
    # The patient's left is the image's right half (radiological display); the zone shares are measured there.
    middle = mid_height(reference, "right")
    if middle is None:
        return None  # no lesion on the patient's left in the reference: no zone figure
    for panel in panels:
        panel["upper"] = share_above(panel["mask"] & right_half(panel["mask"]), middle)
    return dict(id=image_id, image=mrml.volume_array(volume)[0][0], reference=reference, panels=panels,
                name=segment.GetName(), color=segment.GetColor(), middle=middle,
                zone_steering=panels[2]["upper"] - panels[3]["upper"],
                sides_label=panels[0]["result"].sides_label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model name or folder (a QaTa-COV19 chest X-ray model)")
    parser.add_argument("output", help="PNG to write")
    parser.add_argument("--count", type=int, default=40,
                        help="validation images to choose from (bilateral, all of the patient's left lung named)")
    args = parser.parse_args()

    def report(image_id: str) -> str:
        return (DATA / "reports" / f"{image_id}.txt").read_text(encoding="utf-8")

    # Bilateral cases whose report names all of the patient's left lung (the image's right: the reports name the
    # image's sides).
    ids = [i for i in json.loads((DATA / "split.json").read_text())["val"]
           if report_laterality(report(i)) == "bilateral" and "right" in whole_sides(report(i))][: args.count]
    segmenter = Segmenter.load(args.model, "cpu")
    with tempfile.TemporaryDirectory() as folder:
        cases = [case for case in (segment_case(i, segmenter, Path(folder)) for i in ids) if case is not None]
    steering = np.array([c["zone_steering"] for c in cases])
    case = cases[int(np.argmin(np.abs(steering - np.median(steering))))]

    fig, axes = plt.subplots(1, 5, figsize=(21, 5.8), dpi=100)
    for ax, panel in zip(axes, case["panels"]):
        mask, result = panel["mask"], panel["result"]
        ax.imshow(case["image"], cmap="gray")
        overlay = np.zeros(mask.shape + (4,))
        overlay[..., :3] = case["color"]
        overlay[..., 3] = 0.45 * (mask > 0)
        ax.imshow(overlay)
        ax.contour(mask > 0, levels=[0.5], colors=[case["color"]], linewidths=1.5)
        ax.contour(case["reference"], levels=[0.5], colors=["#40e0ff"], linewidths=1.0, linestyles="dashed")
        where = (f"{100 * panel['upper']:.0f}% of it above the dotted line" if "left lung" in
                 panel["title"] else f"{100 * patient_left_share(mask):.0f}% on the patient's left")
        ax.set_title(f"{panel['title']}\nDice {dice(mask, case['reference']):.2f}, {where}", fontsize=10)
        if "left lung" in panel["title"]:  # the left lesion's mid-height, which the zone share is measured from
            ax.plot([mask.shape[1] / 2, mask.shape[1] - 1], [case["middle"] - 0.5] * 2, color="#ffd24d", linewidth=1.0,
                    linestyle="dotted")
        ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="white", fontsize=13, va="center")
        ax.text(0.95, 0.5, "L", transform=ax.transAxes, color="white", fontsize=13, va="center")
        ax.axis("off")
        approximated = result.report_source == "prototype"
        note = f"approximated from the image, similarity {result.similarity:.2f}" if approximated else "typed"
        face, edge = ("#fff7e6", "#b36b00") if approximated else ("white", "#888888")
        ax.text(0.0, -0.03, "\n".join(textwrap.wrap(f"Report: {result.report}", 42)) + f"\n({note})",
                transform=ax.transAxes, va="top", ha="left", fontsize=9, family="monospace",
                bbox=dict(boxstyle="round", facecolor=face, edgecolor=edge))
    fig.suptitle(f"LanguageGuidedSeg, model '{segmenter.config.name}' on QaTa-COV19 validation image {case['id']} "
                 f"({case['sides_label']}; R/L: the patient's sides)\nfilled: the segment read back from the "
                 "segmentation node after each report; dashed: reference mask; dotted: the middle of the reference "
                 "lesion's height on the patient's left", fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.83, bottom=0.2, wspace=0.04)
    fig.savefig(args.output)
    print(f"{args.output}: {case['id']}, zone steering {case['zone_steering']:.2f}; median {np.median(steering):.2f} "
          f"over {len(cases)} bilateral validation images whose report names all of the patient's left lung")


if __name__ == "__main__":
    main()
