"""Make the result picture of docs/slicer.md: a report edit moving the mask, through the MRML bridge as the module runs.

A chest X-ray is loaded into a volume node with Slicer's own reader and segmented four times into the same
segmentation node, as a clinician would in the module (left/right = the patient's sides, the module's default): no
report (the approximation), the case's own report, then the report edited to name only the patient's left lung and
only the right lung. The segment is read back from the node each time. The example is the bilateral validation case
(among the first ``--count``) whose steering (share of the segment on the patient's left with the "left" edit minus
that with the "right" edit) is closest to the median: a typical case, not the best one.

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

import matplotlib
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import slicer  # noqa: E402

from languageguidedseg import mrml  # noqa: E402
from languageguidedseg.inference import Segmenter  # noqa: E402
from languageguidedseg.laterality import left_share, report_laterality  # noqa: E402
from languageguidedseg.sides import RADIOLOGICAL_DISPLAY, translate_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT.parent / "shared" / "data" / "qata-cov19"
# What a clinician types to keep one side (the patient's sides, the module's default).
EDITS = {side: f"unilateral pulmonary infection, one infected area, middle lower {side} lung." for side in
         ("left", "right")}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a != 0, b != 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def patient_left_share(mask: np.ndarray) -> float:
    """Share of the mask on the patient's left: the image's right half (a radiograph in radiological display,
    which is how Slicer shows a PNG: its columns run towards the patient's left)."""
    share = left_share(mask)
    return 0.5 if np.isnan(share) else 1.0 - share


def segment_case(image_id: str, segmenter: Segmenter, folder: Path) -> dict:
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
                          ("Edited: only the left lung", EDITS["left"]),
                          ("Edited: only the right lung", EDITS["right"])):
        result = mrml.segment_volume_node(volume, segmentation, report=report, model=segmenter)
        mask = mrml.segment_mask(segmentation, result.segment_id, volume)[0]
        panels.append(dict(title=title, mask=mask, result=result))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "masks" / f"{image_id}.png"))) > 127
    segment = segmentation.GetSegmentation().GetSegment(panels[0]["result"].segment_id)
    steering = patient_left_share(panels[2]["mask"]) - patient_left_share(panels[3]["mask"])
    return dict(id=image_id, image=mrml.volume_array(volume)[0][0], reference=reference, panels=panels,
                name=segment.GetName(), color=segment.GetColor(), steering=steering,
                sides_label=panels[0]["result"].sides_label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model name or folder (a QaTa-COV19 chest X-ray model)")
    parser.add_argument("output", help="PNG to write")
    parser.add_argument("--count", type=int, default=60, help="validation images to choose from")
    args = parser.parse_args()

    ids = json.loads((DATA / "split.json").read_text())["val"][: args.count]
    bilateral = [i for i in ids if report_laterality((DATA / "reports" / f"{i}.txt").read_text()) == "bilateral"]
    segmenter = Segmenter.load(args.model, "cpu")
    with tempfile.TemporaryDirectory() as folder:
        cases = [segment_case(i, segmenter, Path(folder)) for i in bilateral]
    steering = np.array([c["steering"] for c in cases])
    case = cases[int(np.argmin(np.abs(steering - np.median(steering))))]

    fig, axes = plt.subplots(1, 4, figsize=(17, 5.6), dpi=100)
    for ax, panel in zip(axes, case["panels"]):
        mask, result = panel["mask"], panel["result"]
        ax.imshow(case["image"], cmap="gray")
        overlay = np.zeros(mask.shape + (4,))
        overlay[..., :3] = case["color"]
        overlay[..., 3] = 0.45 * (mask > 0)
        ax.imshow(overlay)
        ax.contour(mask > 0, levels=[0.5], colors=[case["color"]], linewidths=1.5)
        ax.contour(case["reference"], levels=[0.5], colors=["#40e0ff"], linewidths=1.0, linestyles="dashed")
        ax.set_title(f"{panel['title']}\nDice {dice(mask, case['reference']):.2f}, "
                     f"{100 * patient_left_share(mask):.0f}% on the patient's left", fontsize=11)
        ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="white", fontsize=13, va="center")
        ax.text(0.95, 0.5, "L", transform=ax.transAxes, color="white", fontsize=13, va="center")
        ax.axis("off")
        approximated = result.report_source == "prototype"
        note = f"approximated from the image, similarity {result.similarity:.2f}" if approximated else "typed"
        face, edge = ("#fff7e6", "#b36b00") if approximated else ("white", "#888888")
        ax.text(0.0, -0.03, "\n".join(textwrap.wrap(f"Report: {result.report}", 46)) + f"\n({note})",
                transform=ax.transAxes, va="top", ha="left", fontsize=9, family="monospace",
                bbox=dict(boxstyle="round", facecolor=face, edgecolor=edge))
    fig.suptitle(f"LanguageGuidedSeg, model '{segmenter.config.name}' on QaTa-COV19 validation image {case['id']} "
                 f"({case['sides_label']}; R/L: the patient's sides)\nfilled: the segment read back from the "
                 "segmentation node after each report; dashed: reference mask", fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.83, bottom=0.2, wspace=0.04)
    fig.savefig(args.output)
    print(f"{args.output}: {case['id']}, steering {case['steering']:.2f}; median steering {np.median(steering):.2f} "
          f"over {len(cases)} bilateral validation images")


if __name__ == "__main__":
    main()
