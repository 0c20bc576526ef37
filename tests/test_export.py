"""`carrara export default`: fp16 copy of a run, loadable as a model folder, within the size budget."""
import pytest
import torch
from safetensors.torch import load_file

from carrara.cli import main
from carrara.errors import CarraraError
from carrara.export import export_default
from carrara.pipeline import Pipeline


def test_export_writes_fp16_weights_that_sample_like_the_run(tiny_diffusion_run, tmp_path):
    out = tmp_path / "default"
    result = export_default(tiny_diffusion_run, out)
    assert result["out"] == str(out)
    for part in ("unet", "vae"):
        tensors = load_file(str(out / part / "diffusion_pytorch_model.safetensors"))
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    assert (out / "training" / "diffusion" / "log.txt").is_file()
    kwargs = {"steps": 4, "sampler": "ddim", "guidance": 3.0, "seed": 5, "output": "tensor"}
    a = Pipeline.load(tiny_diffusion_run)(["a red circle"], **kwargs)
    b = Pipeline.load(out)(["a red circle"], **kwargs)
    diff = (a - b).abs().mean().item()
    assert diff < 2e-3, diff  # fp16 rounding of the weights only
    assert not list(tmp_path.glob(".export-*"))  # no temporary folder left behind


def test_export_over_budget_leaves_nothing(tiny_diffusion_run, tmp_path):
    with pytest.raises(CarraraError, match="MB budget"):
        export_default(tiny_diffusion_run, tmp_path / "default", max_mb=0.001)
    assert list(tmp_path.iterdir()) == []


def test_export_cli_bad_model_is_one_line(tmp_path, capsys):
    assert main(["export", "default", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
