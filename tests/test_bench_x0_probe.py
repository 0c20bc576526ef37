"""bench/x0_probe.py: a denoiser's x̂0 against its own and the other images, on the tiny model."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import x0_probe

from carrara.errors import CarraraError
from carrara.pipeline import Pipeline


def test_the_probe_tells_a_model_that_reads_x_t_from_one_that_does_not(tiny_diffusion_run, tiny_shapes):
    pipe = Pipeline.load(tiny_diffusion_run, precision="fp32")
    records = [line for line in (tiny_shapes / "metadata.jsonl").read_text().splitlines()][:3]
    names = [__import__("json").loads(r)["text"] for r in records]
    images = x0_probe.load_named(str(tiny_shapes), names, pipe.sizes[0])
    real = x0_probe.probe(pipe, images, "a shape", levels=(100, 900))
    assert set(real) == {"100", "900"} and all(v["spread"] > 0 for v in real.values())
    # a U-Net replaced by one that ignores x_t (its x̂0 is 0 whatever it sees): spread 0, own ≈ other
    pipe.unet.forward = lambda z, t, *a, **k: blind_output(pipe, z, t)
    flat = x0_probe.probe(pipe, images, "a shape", levels=(100,))["100"]
    assert flat["spread"] == pytest.approx(0, abs=1e-6) and flat["own"] == pytest.approx(flat["other"], rel=0.5)
    assert real["100"]["own"] < real["100"]["other"]  # the trained one reads x_t at low noise


def blind_output(pipe, z, t):
    """The network output whose x̂0 is 0 for every input: ε = x_t / σ, or v = α x_t / σ."""
    a = pipe.schedule.alphas_cumprod[t].float()[:, None, None, None]
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    if pipe.schedule.prediction_type.value == "epsilon":
        return z / sigma  # x0 = (x_t − σ ε) / α = 0
    return alpha * z / sigma  # x0 = α x_t − σ v = 0


def test_the_probe_refuses_unknown_captions(tiny_shapes):
    with pytest.raises(CarraraError, match="--names"):
        x0_probe.load_named(str(tiny_shapes), ["no such caption", "nor this"], 16)
