"""Start-up cost: segmenting loads no MONAI, the decoder blocks equal MONAI's, the CPU compilation waits for work."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from languageguidedseg.blocks import UnetOutBlock, UnetResBlock
from languageguidedseg.encoders import EfficientNetLite
from languageguidedseg.inference import FUSE_AFTER_SLICES, Segmenter


@pytest.mark.parametrize("report", [None, "bilateral pulmonary infection, lower left lung."])
def test_segmenting_imports_no_monai_and_no_transformers(tiny_model, tmp_path, report):
    """MONAI's package __init__ imports all of MONAI (seconds); the inference path must not pay for it, nor for
    transformers (about 2 s more): the default text encoder is a plain BERT, run by languageguidedseg.bert."""
    image = tmp_path / "image.png"
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.full((64, 64), 100, np.uint8)), str(image))
    code = (
        "import json, sys\n"
        "from languageguidedseg.cli import main\n"
        f"code = main(['segment', {str(image)!r}, '--model', {str(tiny_model)!r}, '-o', {str(tmp_path / 'm.png')!r},"
        f" '--quiet'{', ' + repr('--report') + ', ' + repr(report) if report else ''}])\n"
        "print(json.dumps([code, sorted({m.split('.')[0] for m in sys.modules})]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    code, modules = json.loads(result.stdout.splitlines()[-1])
    assert code == 0
    assert "torch" in modules and "monai" not in modules and "transformers" not in modules
    assert ("tokenizers" in modules) == (report is not None)  # the text encoder did run


@pytest.mark.parametrize("cin, cout", [(40, 24), (24, 24)])
def test_blocks_equal_monai(cin, cout):
    """Same parameter names and same outputs from the same weights as MONAI's blocks (models load either way)."""
    from monai.networks.blocks import UnetOutBlock as MonaiOut
    from monai.networks.blocks import UnetResBlock as MonaiRes

    torch.manual_seed(0)
    ours, theirs = UnetResBlock(cin, cout), MonaiRes(2, cin, cout, kernel_size=3, stride=1, norm_name="batch")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict({k: torch.randn_like(v) if v.is_floating_point() else v
                            for k, v in theirs.state_dict().items()})
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, cin, 16, 16)
    for mode in (True, False):  # training (batch statistics) and eval (running statistics)
        ours.train(mode), theirs.train(mode)
        torch.testing.assert_close(ours(x.clone()), theirs(x.clone()))

    head, monai_head = UnetOutBlock(cout, 1), MonaiOut(2, cout, 1)
    assert head.state_dict().keys() == monai_head.state_dict().keys()
    head.load_state_dict(monai_head.state_dict())
    y = torch.randn(2, cout, 16, 16)
    torch.testing.assert_close(head(y), monai_head(y))


def test_cpu_compilation_waits_for_enough_slices(tiny_model):
    """One image runs eager (compiling would cost more than it saves); a volume's worth of slices compiles, and
    the probabilities stay the same."""
    segmenter = Segmenter.load(tiny_model, "cpu")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (1, 96, 96), dtype=np.uint8)
    eager, _, _, _ = segmenter.predict_slices(image)
    assert isinstance(segmenter.network.encoder, EfficientNetLite), "one image should not compile the network"
    segmenter.predict_slices(np.repeat(image, FUSE_AFTER_SLICES, axis=0))
    assert not isinstance(segmenter.network.encoder, EfficientNetLite), "the network was not compiled"
    compiled, _, _, _ = segmenter.predict_slices(image)
    np.testing.assert_allclose(compiled, eager, atol=1e-4)
