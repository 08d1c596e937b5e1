"""Make the result picture of docs/slicer.md: a validation image segmented through the MRML bridge, as the module does.

The image is loaded into a volume node with Slicer's own reader, segmented twice into the same segmentation node
(no report: the approximation; then the dataset's report as the edited text), and the segment is read back from the
node. The example is the validation image (among the first ``--count``) whose Dice with the report is closest to the
median, preferring one where the report helps: a typical case, not the best one.

Usage (from the repository root, with slicer-core installed)::

    PYTHONPATH=Logic python LanguageGuidedSeg/Resources/Screenshots/make_result.py MODEL_DIR kvasir-seg \\
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

ROOT = Path(__file__).resolve().parents[3]
DATASET_TITLES = {"qata-cov19": "QaTa-COV19", "kvasir-seg": "Kvasir-SEG"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a != 0, b != 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def segment_case(data: Path, image_id: str, segmenter: Segmenter, rgb: bool, folder: Path) -> dict:
    scene = slicer.vtkMRMLScene()
    nrrd = folder / f"{image_id}.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(next((data / "images").glob(f"{image_id}.*")))), str(nrrd))
    volume = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if rgb else "vtkMRMLScalarVolumeNode", image_id)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(nrrd))
    volume.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(volume):
        raise RuntimeError(f"cannot read {nrrd}")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    approximated = mrml.segment_volume_node(volume, segmentation, report=None, model=segmenter)
    approximated_mask = mrml.segment_mask(segmentation, approximated.segment_id, volume)[0]
    report = (data / "reports" / f"{image_id}.txt").read_text(encoding="utf-8").strip()
    given = mrml.segment_volume_node(volume, segmentation, report=report, model=segmenter)
    given_mask = mrml.segment_mask(segmentation, given.segment_id, volume)[0]
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "masks" / f"{image_id}.png"))) > 127
    segment = segmentation.GetSegmentation().GetSegment(given.segment_id)
    return dict(id=image_id, image=mrml.volume_array(volume)[0][0], reference=reference, report=report,
                approximated=approximated, approximated_mask=approximated_mask, given_mask=given_mask,
                name=segment.GetName(), color=segment.GetColor(),
                dice_approximated=dice(approximated_mask, reference), dice_given=dice(given_mask, reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model folder")
    parser.add_argument("dataset", choices=sorted(DATASET_TITLES))
    parser.add_argument("output", help="PNG to write")
    parser.add_argument("--count", type=int, default=40, help="validation images to choose from")
    args = parser.parse_args()

    data = ROOT.parent / "shared" / "data" / args.dataset
    rgb = args.dataset == "kvasir-seg"
    ids = json.loads((data / "split.json").read_text())["val"][: args.count]
    segmenter = Segmenter(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        cases = [segment_case(data, i, segmenter, rgb, Path(folder)) for i in ids]
    given = np.array([c["dice_given"] for c in cases])
    gain = given - np.array([c["dice_approximated"] for c in cases])
    case = cases[int(np.argmin(np.abs(given - np.median(given)) - 0.5 * gain))]

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.9), dpi=110)
    panels = (
        ("No report: approximated", case["approximated_mask"], case["approximated"].report,
         f"approximated from the image, similarity {case['approximated'].similarity:.2f}",
         case["dice_approximated"], ("#fff7e6", "#b36b00")),
        ("Edited report: used as written", case["given_mask"], case["report"], "given", case["dice_given"],
         ("white", "#888888")),
    )
    for ax, (title, mask, text, note, score, (face, edge)) in zip(axes, panels):
        ax.imshow(case["image"], cmap=None if rgb else "gray")
        overlay = np.zeros(mask.shape + (4,))
        overlay[..., :3] = case["color"]
        overlay[..., 3] = 0.45 * (mask > 0)
        ax.imshow(overlay)
        ax.contour(mask > 0, levels=[0.5], colors=[case["color"]], linewidths=1.5)
        ax.contour(case["reference"], levels=[0.5], colors=["#40e0ff"], linewidths=1.0, linestyles="dashed")
        ax.set_title(f"{title}\nsegment '{case['name']}', Dice {score:.2f}", fontsize=11)
        ax.axis("off")
        ax.text(0.0, -0.04, "\n".join(textwrap.wrap(f"Report: {text}", 56)) + f"\n({note})", transform=ax.transAxes,
                va="top", ha="left", fontsize=9, family="monospace",
                bbox=dict(boxstyle="round", facecolor=face, edgecolor=edge))
    model_name = segmenter.package.name
    fig.suptitle(f"LanguageGuidedSeg, model '{model_name}' on {DATASET_TITLES[args.dataset]} validation image "
                 f"{case['id']}\nfilled: the segment read back from the segmentation node; dashed: reference mask",
                 fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.83, bottom=0.16, wspace=0.05)
    fig.savefig(args.output)
    print(f"{args.output}: {case['id']}, Dice {case['dice_approximated']:.2f} (approximated, similarity "
          f"{case['approximated'].similarity:.2f}) / {case['dice_given']:.2f} (report); median Dice with report "
          f"{np.median(given):.2f} over {len(cases)} images")


if __name__ == "__main__":
    main()
