"""models/int8.py: the int8 U-Net computes what its calibrated quantization says (both kernels), the calibration is
deterministic and round-trips through its file, the fp32 layers are the listed ones, and misuse is one line."""
import copy
import json
from statistics import mean

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_UNET

from carrara.cli import main
from carrara.diffusion.settings import DEFAULTS
from carrara.errors import CarraraError
from carrara.models import int8
from carrara.models.config import UNetConfig
from carrara.models.unet import UNet2DConditionModel
from carrara.png import read_png_metadata

MATCH = 2e-3  # an int8 layer vs its quantization simulated in fp32: rounding ties and fp32 sum order only
MEAN_MATCH = 5e-5  # the same, averaged over the layers: most are exact (measured 6e-6 FBGEMM, 2e-7 oneDNN)
CONFIG = {**TINY_UNET, "sample_size": 8, "cross_attention_dim": 16}


def tiny_unet() -> UNet2DConditionModel:
    """The tiny U-Net, its weights off zero mean as trained ones are, so a zero point's error shows in every layer."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig.from_diffusers_config(CONFIG)).eval()
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight += 0.5 * m.weight.std()
    return unet


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 917]), torch.randn(2, 5, 16, generator=g)


def calibrated(unet) -> dict:
    """Ranges from three calls (three timesteps, both 'guidance halves' in the batch)."""
    def run():
        for seed in (1, 2, 3):
            unet(*inputs(seed))
    with torch.no_grad():
        return int8.calibration_record(unet, int8.collect_ranges(unet, run), "0123456789ab", {"steps": 3})


def simulated(unet, record: dict, zp_shift: int = 0, scale_factor: float = 1.0):
    """The fp32 U-Net with every quantized layer's arithmetic simulated: s8 weights, 7-bit inputs on the calibrated
    grid, and FBGEMM's u8 output grid where that kernel runs (int8's own rules choose, as the int8 U-Net does)."""
    ref = copy.deepcopy(unet)
    for name, m in int8.quantizable_layers(ref).items():
        r = record["layers"][name]
        s, zp = int8.act_qparams(*r["input"])
        s, zp = s * scale_factor, zp + zp_shift
        out_s, out_zp = int8.act_qparams(*r["output"], qmax=255)
        w8, ws = int8.weight_qparams(m.weight.detach())
        m.weight.data = w8.float() * ws.view(-1, *[1] * (w8.dim() - 1))

        def forward(x, m=m, s=s, zp=zp, out_s=out_s, out_zp=out_zp):
            if isinstance(m, torch.nn.Conv2d):
                rows, runs_int8 = x.shape[0] * (-(-x.shape[2] // m.stride[0])) * (-(-x.shape[3] // m.stride[1])), True
                y = F.conv2d(int8.fake_quant(x, s, zp, 0, int8.ACT_QMAX), m.weight, m.bias, m.stride, m.padding)
            else:
                rows = x.numel() // m.in_features
                runs_int8 = rows * m.in_features * m.out_features >= int8.SMALL_LINEAR_MACS
                if not runs_int8:
                    return F.linear(x, unet.get_submodule(name_of[m]).weight, m.bias)
                y = F.linear(int8.fake_quant(x, s, zp, 0, int8.ACT_QMAX), m.weight, m.bias)
            return int8.fake_quant(y, out_s, out_zp, 0, 255) if rows <= int8.FBGEMM_MAX_ROWS else y
        m.forward = forward
    name_of = {m: n for n, m in int8.quantizable_layers(ref).items()}
    return ref


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


def layer_errors(quantized, reference, x) -> list[float]:
    """Each int8 layer's output against the simulation of its own input (as the int8 U-Net ran it): per layer, as a
    rounding tie one layer resolves differently moves every later activation a little."""
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n, m in quantized.named_modules() if isinstance(m, int8.Int8Layer)]
    try:
        quantized(*x)
    finally:
        for h in hooks:
            h.remove()
    return [rel_err(out, reference.get_submodule(n)(inp)) for n, (inp, out) in seen.items()]


@pytest.mark.parametrize("kernel", ["fbgemm", "onednn"])
def test_int8_unet_equals_its_simulated_quantization(kernel, monkeypatch):
    """Every quantized layer on int8 (no fp32 fallback for small linears), on FBGEMM (all GEMMs ≤ 128 rows here) or
    oneDNN; the bound fails for a zero point one off or scales 3 % off in the simulation."""
    monkeypatch.setattr(int8, "SMALL_LINEAR_MACS", 0)
    monkeypatch.setattr(int8, "FBGEMM_MAX_ROWS", 128 if kernel == "fbgemm" else 0)
    unet = tiny_unet()
    record = calibrated(unet)
    quantized = int8.quantize_unet(copy.deepcopy(unet), record)
    x = inputs(4)  # not a calibration input: activations may pass the calibrated range and saturate
    with torch.no_grad():
        right = layer_errors(quantized, simulated(unet, record), x)
        off_zp = layer_errors(quantized, simulated(unet, record, zp_shift=1), x)
        off_scale = layer_errors(quantized, simulated(unet, record, scale_factor=1.03), x)
        y, fp32 = quantized(*x), unet(*x)
    assert len(right) == 46 and max(right) <= MATCH and mean(right) <= MEAN_MATCH, (max(right), mean(right))
    assert mean(off_zp) > 3 * MEAN_MATCH and mean(off_scale) > 3 * MEAN_MATCH
    assert 1e-3 < rel_err(y, fp32) < 0.1  # int8, and close to fp32


def test_small_linears_run_fp32_and_the_rest_int8():
    unet = tiny_unet()
    quantized = int8.quantize_unet(copy.deepcopy(unet), calibrated(unet))
    layer = quantized.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert isinstance(layer, int8.Int8Linear) and not layer.runs_int8(128)  # 128·32·32 MACs: fp32 is faster
    assert layer.runs_int8(4096)
    x = torch.randn(2, 64, 32)
    assert torch.equal(layer(x), F.linear(x, unet.get_submodule(
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight))


def test_calibration_is_deterministic_and_round_trips(tmp_path):
    unet = tiny_unet()
    record = calibrated(unet)
    assert record == calibrated(unet)
    assert record["activation_qmax"] == 127 and record["unet_hash"] == "0123456789ab"
    for r in record["layers"].values():
        assert r["input"][0] <= r["input"][1] and r["output"][0] <= r["output"][1]
    path = int8.write_calibration(tmp_path, record)
    assert path == tmp_path / "int8_calibration.json" and not list(tmp_path.glob("*.tmp*"))
    back = int8.read_calibration(tmp_path, "0123456789ab", "m")
    assert back == record
    x = inputs(5)
    with torch.no_grad():
        assert torch.equal(int8.quantize_unet(copy.deepcopy(unet), back)(*x),
                           int8.quantize_unet(copy.deepcopy(unet), record)(*x))


def test_the_layers_kept_fp32_are_exactly_the_listed_ones():
    unet = tiny_unet()
    quantized = int8.quantize_unet(copy.deepcopy(unet), calibrated(unet))
    fp32 = [n for n, m in quantized.named_modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
    expected = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
                "down_blocks.1.resnets.0.conv_shortcut", "up_blocks.0.resnets.0.conv_shortcut",
                "up_blocks.0.resnets.1.conv_shortcut", "up_blocks.1.resnets.0.conv_shortcut",
                "up_blocks.1.resnets.1.conv_shortcut"}
    expected |= {f"{b}.resnets.{i}.time_emb_proj" for b, n in (("down_blocks.0", 1), ("down_blocks.1", 1),
                                                               ("mid_block", 2), ("up_blocks.0", 2), ("up_blocks.1", 2))
                 for i in range(n)}
    for t in ("down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0",
              "up_blocks.1.attentions.1"):
        expected |= {f"{t}.proj_in", f"{t}.proj_out"}  # 1×1 convolutions in this config
        expected |= {f"{t}.transformer_blocks.0.{x}" for x in ("attn2.to_k", "attn2.to_v", "ff.net.2")}
    assert set(fp32) == expected == set(int8.kept_in_fp32(unet)) and len(fp32) == len(expected)
    int8_layers = [n for n, m in quantized.named_modules() if isinstance(m, int8.Int8Layer)]
    assert len(int8_layers) == len(calibrated(unet)["layers"]) == 46
    assert all(isinstance(quantized.get_submodule(n), int8.Int8Conv2d) for n in int8_layers if ".conv" in n)


@pytest.fixture()
def model_copy(tiny_diffusion_run, tmp_path):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(tiny_diffusion_run, out)
    return out


def one_line_error(argv, capsys) -> str:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("carrara: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_or_foreign_calibration_is_one_line(model_copy, tmp_path, capsys):
    argv = ["generate", "a red circle", "--model", str(model_copy), "--precision", "int8", "--steps", "2",
            "-o", str(tmp_path / "x.png"), "--quiet"]
    assert "carrara quantize" in one_line_error(argv, capsys)
    (model_copy / "unet" / "int8_calibration.json").write_text(json.dumps(
        {"format": 1, "unet_hash": "ffffffffffff", "layers": {}}))
    err = one_line_error(argv, capsys)
    assert "ffffffffffff" in err and "carrara quantize" in err
    (model_copy / "unet" / "int8_calibration.json").write_text("{not json")
    assert "carrara quantize" in one_line_error(argv, capsys)
    assert not (tmp_path / "x.png").exists()


def test_a_hand_edited_calibration_with_a_point_or_reversed_range_is_refused(model_copy, tmp_path, capsys):
    """Zero-width or reversed ranges would quantize every activation to one value: a garbage image, in silence."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert main(["quantize", "--model", str(model_copy), "--prompts", str(prompts), "--n", "1"]) == 0
    path = model_copy / "unet" / "int8_calibration.json"
    good = json.loads(path.read_text())
    argv = ["generate", "a red circle", "--model", str(model_copy), "--precision", "int8", "--steps", "2",
            "-o", str(tmp_path / "x.png"), "--quiet"]
    first = next(iter(good["layers"]))
    for field, bad in (("input", [0.5, 0.5]), ("output", [3.0, -1.0])):
        record = json.loads(json.dumps(good))
        record["layers"][first][field] = bad
        path.write_text(json.dumps(record))
        assert "not a readable int8 calibration" in one_line_error(argv, capsys), (field, bad)
    assert not (tmp_path / "x.png").exists()
    path.write_text(json.dumps(good))
    assert main(argv) == 0


def test_quantize_then_generate_int8(model_copy, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    assert main(["quantize", "--model", str(model_copy), "--prompts", str(prompts), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "int8_calibration.json" in out and "mean |Δpixel| int8 vs fp32" in out
    record = json.loads((model_copy / "unet" / "int8_calibration.json").read_text())
    assert record["settings"]["prompts"] == 2
    assert {k: record["settings"][k] for k in ("steps", "sampler", "guidance")} == {  # what it was calibrated for
        "steps": DEFAULTS.steps, "sampler": DEFAULTS.sampler, "guidance": DEFAULTS.guidance}
    from carrara.pipeline import Pipeline

    pipe = Pipeline.load(model_copy, precision="int8")
    assert pipe.precision == "int8" and record["unet_hash"] == pipe.model_hash
    assert any(isinstance(m, int8.Int8Conv2d) for m in pipe.unet.modules())
    fp32 = Pipeline.load(model_copy, precision="fp32")
    a, b = (p(["a red circle"], steps=3, output="tensor") for p in (pipe, fp32))
    assert 0 < int8.pixel_diff_255(a, b) < 20
    assert main(["generate", "a red circle", "--model", str(model_copy), "--precision", "int8", "--steps", "2",
                 "-o", str(tmp_path / "x.png"), "--quiet"]) == 0
    with pytest.raises(CarraraError, match="quantized"):
        Pipeline(unet=fp32.unet, vae=fp32.vae, text_encoder=fp32.text_encoder, schedule=fp32.schedule,
                 precision="int8")


def test_quantization_parameters_by_hand():
    """The simulation above shares these two functions with the int8 layers, so they are checked on their own: 7-bit
    u8 activations with 0 on the grid, symmetric s8 weights per output channel."""
    scale, zp = int8.act_qparams(-1.0, 3.0)  # [−1, 3] onto 0…127: s = 4/127, zp = round(31.75)
    assert scale == pytest.approx(4 / 127) and zp == 32
    assert int8.act_qparams(0.5, 2.0) == (pytest.approx(2 / 127), 0)  # the range widens to hold 0
    assert int8.act_qparams(-2.0, -1.0) == (pytest.approx(2 / 127), 127)
    assert int8.act_qparams(-1.0, 3.0, qmax=255) == (pytest.approx(4 / 255), 64)  # FBGEMM's 8-bit output grid
    x = torch.tensor([-1.0, 0.0, 3.0, 5.0])
    assert torch.allclose(int8.fake_quant(x, scale, zp, 0, 127), torch.tensor([-32, 0, 95, 95]) * scale)  # saturates
    w8, scales = int8.weight_qparams(torch.tensor([[0.5, -1.27], [2.54, 0.0]]))
    assert torch.equal(w8, torch.tensor([[50, -127], [127, 0]], dtype=torch.int8))
    assert torch.allclose(scales, torch.tensor([0.01, 0.02]))


def test_auto_is_int8_without_native_bf16_where_a_calibration_is(model_copy, tmp_path, monkeypatch, capsys):
    """precision "auto" on a CPU without native bf16 (CARRARA_BF16=0 makes this one such): fp32 until `carrara
    quantize` has calibrated these weights, int8 after; explicit fp32 and a LoRA merge stay fp32; with native bf16,
    bf16 still."""
    from carrara.pipeline import Pipeline

    monkeypatch.setenv("CARRARA_BF16", "0")
    assert Pipeline.load(model_copy).precision == "fp32"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert main(["quantize", "--model", str(model_copy), "--prompts", str(prompts), "--n", "1"]) == 0
    auto = Pipeline.load(model_copy)
    assert auto.precision == "int8" and int8.is_int8(auto.unet)
    assert Pipeline.load(model_copy, precision="fp32").precision == "fp32"
    assert Pipeline.load(model_copy, auto_int8=False).precision == "fp32"
    record = json.loads((model_copy / "unet" / int8.CALIBRATION_FILE).read_text())
    (model_copy / "unet" / int8.CALIBRATION_FILE).write_text(json.dumps({**record, "unet_hash": "ffffffffffff"}))
    assert Pipeline.load(model_copy).precision == "fp32"  # a calibration of other weights: auto does not take it
    (model_copy / "unet" / int8.CALIBRATION_FILE).write_text(json.dumps(record))
    out = tmp_path / "auto.png"
    assert main(["generate", "a red circle", "--model", str(model_copy), "--steps", "2", "-o", str(out),
                 "--quiet"]) == 0
    assert read_png_metadata(out)["precision"] == "int8"  # recorded, so --from makes it again in int8
    report = tmp_path / "faith.json"
    assert main(["eval", "faithfulness", "--model", str(model_copy), "--n", "2", "--steps", "2", "--precision", "fp32",
                 "--out", str(report), "--quiet"]) == 0
    assert json.loads(report.read_text())["precision"] == "fp32"  # asked for, though auto would be int8 here
    monkeypatch.setenv("CARRARA_BF16", "1")
    assert Pipeline.load(model_copy).precision == "bf16"
