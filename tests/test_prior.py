"""The unCLIP diffusion prior: it learns (loss falls, samples land near their captions' images), its attention is
causal, guidance w = 1 is the conditional model, and sampling is a function of the seed."""
import json

import pytest
import torch

from carrara.cli import main
from carrara.diffusion.schedule import NoiseSchedule
from carrara.errors import CarraraError
from carrara.models.prior import DiffusionPriorNetwork, PriorConfig
from carrara.prior import (
    CANDIDATE_STRIDE,
    Prior,
    PriorSettings,
    chance_top_k,
    null_condition,
    prior_check,
    sample_embeddings,
    trim,
)
from carrara.train.core import TrainConfig
from carrara.train.prior import PriorRecipe, train_prior

TINY = {"width": 32, "layers": 2, "heads": 4, "mlp_ratio": 2}


def tiny_recipe(data, clip, steps=60):
    return PriorRecipe(data=str(data), clip=str(clip), holdout=8, model=dict(TINY),
                       sample={"steps": 8, "sampler": "ddim", "guidance": 2.0},
                       train=TrainConfig(steps=steps, batch_size=32, lr=3e-3, warmup_steps=5, log_every=5,
                                         checkpoint_every=30, sample_every=1000, ema_decay=0.9, bf16=False))


@pytest.fixture(scope="module")
def prior_run(tiny_shapes, tiny_clip_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("prior")
    result = train_prior(tiny_recipe(tiny_shapes, tiny_clip_run[0]), run, progress=False)
    return run, result


def random_condition(config: PriorConfig, b: int, length: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (b, 1), generator=g)  # (B, L), ≥ 1 token
    return (torch.randn(b, length, config.text_dim, generator=g), mask,
            torch.nn.functional.normalize(torch.randn(b, config.embed_dim, generator=g), dim=-1), torch.ones(b))


def tiny_network(seed=0) -> DiffusionPriorNetwork:
    torch.manual_seed(seed)
    return DiffusionPriorNetwork(PriorConfig(embed_dim=8, text_dim=12, max_text_len=10, **TINY)).eval()


def test_the_loss_falls_and_samples_land_near_their_images(prior_run):
    run, result = prior_run
    losses = [json.loads(s)["loss"] for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    check = json.loads((run / "check.json").read_text())["held_out"]
    assert check == result["check"]
    # held-out captions: a sampled z_i is closer to the caption's own image than to a random image, closer than the
    # text embedding itself is (the gap the prior exists to bridge), and finds it far above chance
    assert check["cos_true"] > check["cos_random"] + 0.2 and check["cos_true"] > check["cos_text_true"] + 0.1, check
    assert check["top5"] > check["top5_chance"] + 0.3, check
    assert (run / "prior" / "model.safetensors").is_file() and (run / "cache").is_dir()


def test_causal_mask_keeps_earlier_positions_blind_to_later_ones():
    """Changing x_t (position L + 2) changes the query's output but no output before it; a mask that let earlier
    positions see later ones would move them too. Padded text positions are not attended to at all."""
    net = tiny_network()
    cond = random_condition(net.config, 3)
    x, t = torch.randn(3, 8), torch.tensor([5, 500, 900])
    with torch.no_grad():
        h = net.hidden_states(x, t, cond)
        h2 = net.hidden_states(x + 1.0, t, cond)
        length = cond[0].shape[1]
        assert torch.equal(h[:, :length + 2], h2[:, :length + 2])  # text tokens, z_t, timestep: untouched
        assert (h[:, -1] - h2[:, -1]).abs().max() > 1e-3  # the query sees x_t
        states = cond[0].clone()
        states[~cond[1]] = 99.0  # garbage in the padding
        assert torch.allclose(net(x, t, (states, *cond[1:])), net(x, t, cond), atol=1e-6)
        trimmed = trim(*cond[:2])
        assert torch.allclose(net(x, t, (*trimmed, *cond[2:])), net(x, t, cond), atol=1e-6)


def test_dropped_text_ignores_the_text():
    """keep = 0 is the null condition: the output does not depend on the text, and it differs from keep = 1."""
    net = tiny_network()
    a, b = random_condition(net.config, 2, seed=1), random_condition(net.config, 2, seed=2)
    x, t = torch.randn(2, 8), torch.tensor([100, 700])
    with torch.no_grad():
        drop = torch.zeros(2)
        assert torch.allclose(net(x, t, (*a[:3], drop)), net(x, t, (*b[:3], drop)), atol=1e-6)
        assert torch.allclose(net(x, t, (*a[:3], drop)), net(x, t, tuple(c.expand(2, *c.shape[1:]) for c in null_condition(a))),
                              atol=1e-6)
        assert (net(x, t, a) - net(x, t, b)).abs().max() > 1e-3


def test_guidance_one_is_the_conditional_prediction_and_two_extrapolates():
    net = tiny_network()
    schedule = NoiseSchedule.from_config("cosine", 1000, prediction_type="sample")
    cond = random_condition(net.config, 2)
    calls = []

    def recording(x, t, c):
        calls.append(c[3].tolist())
        return net(x, t, c)

    recording.config = net.config
    w1 = sample_embeddings(recording, schedule, cond, seed=3, guidance=1.0, steps=4)
    assert all(keep == [1.0, 1.0] for keep in calls)  # w = 1: the conditional model alone, never the null pass

    class Conditional(torch.nn.Module):  # the plain conditional model, no guidance machinery
        config = net.config

        def forward(self, x, t, c):  # every row gets the conditional input, the null pass's rows too
            return net(x, t, tuple(a.repeat(len(x) // len(a), *[1] * (a.ndim - 1)) for a in cond))

    assert torch.allclose(w1, sample_embeddings(Conditional(), schedule, cond, seed=3, guidance=7.0, steps=4),
                          atol=1e-6)  # with cond == uncond, any w gives the conditional prediction

    class Manual(torch.nn.Module):  # uncond + 2 (cond − uncond), written out
        config = net.config

        def forward(self, x, t, c):
            u = net(x, t, tuple(c.expand(len(x), *c.shape[1:]) for c in null_condition(cond)))
            return u + 2.0 * (net(x, t, cond) - u)

    w2 = sample_embeddings(net, schedule, cond, seed=3, guidance=2.0, steps=4)
    assert torch.allclose(w2, sample_embeddings(Manual(), schedule, cond, seed=3, guidance=1.0, steps=4), atol=1e-5)
    assert (w2 - w1).abs().max() > 1e-3


def test_sampling_is_a_function_of_the_seed(prior_run):
    prior = Prior.load(prior_run[0])
    a = prior.sample(["a red circle", "a blue square"], n=3, seed=4, sampler="ddpm", steps=6)
    b = prior.sample(["a red circle", "a blue square"], n=3, seed=4, sampler="ddpm", steps=6)
    c = prior.sample(["a red circle", "a blue square"], n=3, seed=5, sampler="ddpm", steps=6)
    assert a.shape == (2, 3, prior.network.config.embed_dim)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3
    assert torch.allclose(a.norm(dim=-1), torch.ones(2, 3), atol=1e-5)
    assert (a[0, 0] - a[0, 1]).abs().max() > 1e-3  # n samples of one prompt differ
    # sample k of prompt p uses seed + p·n + k, whatever the batch: the second prompt alone, seed 4 + 3
    alone = prior.sample(["a blue square"], n=3, seed=7, sampler="ddpm", steps=6)
    assert torch.allclose(alone[0], a[1], atol=1e-5)


def test_pick_keeps_the_draw_nearest_the_caption(prior_run):
    """DALL-E 2 §2.2's trick: of K draws per prompt, the one with the largest z_i · z_t; draw k of prompt p from
    seed + p + k·stride, so a prompt's pick does not depend on its batch, and K = 1 is `sample`'s own draw."""
    prior = Prior.load(prior_run[0])
    prompts, opts = ["a red circle", "a blue square"], {"sampler": "ddpm", "steps": 6, "guidance": 2.0}
    picked = prior.pick(prompts, seed=4, candidates=3, **opts)
    cond = prior.condition(prompts)
    for p in range(2):
        row = tuple(c[p:p + 1] for c in cond)
        draws = torch.cat([sample_embeddings(prior.network, prior.schedule, row, seeds=[4 + p + k * CANDIDATE_STRIDE],
                                             **opts) for k in range(3)])  # (3, E), by hand
        assert torch.cdist(draws, draws).triu(1).max() > 1e-3  # three different draws
        torch.testing.assert_close(picked[p], draws[(draws @ cond[2][p]).argmax()], atol=1e-5, rtol=0)
    alone = prior.pick(["a blue square"], seed=5, candidates=3, **opts)
    torch.testing.assert_close(alone[0], picked[1], atol=1e-5, rtol=0)
    first = prior.pick(prompts, seed=4, candidates=1, **opts)
    torch.testing.assert_close(first, prior.sample(prompts, n=1, seed=4, **opts)[:, 0], atol=1e-5, rtol=0)
    with pytest.raises(CarraraError, match="candidates must be between 1 and 16"):
        prior.pick(prompts, candidates=0)


def test_bad_sampling_settings_are_one_line_before_training(tmp_path):
    """A recipe's `sample` table is checked before the CLIP loads or a step runs: wrong type, range, unknown key."""
    for sample, message in (({"candidates": 0}, "candidates must be an integer in [1, 16], got 0"),
                            ({"candidates": "two"}, "candidates must be an integer"),
                            ({"steps": 2.5}, "steps must be an integer"), ({"sampler": "nonsense"}, "sampler must be"),
                            ({"guidance": 1e9}, "guidance must be a number"), ({"stpes": 10}, "unknown prior sampling")):
        recipe = PriorRecipe(data=str(tmp_path), clip=str(tmp_path / "no-clip"), sample=sample)
        with pytest.raises(CarraraError, match=message.replace("[", r"\[").replace("]", r"\]")):
            train_prior(recipe, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()
    assert PriorSettings.parse({"steps": 5, "future_key": 1}, where="x", strict=False) == PriorSettings(steps=5)


def test_prior_check_numbers():
    pool = torch.eye(4)  # four orthogonal images
    hits = torch.tensor([[True, False, False, False], [False, False, True, True]])
    sampled = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    out = prior_check(sampled, pool[[0, 2]], pool, hits, ks=(1, 2))
    assert out["cos_true"] == pytest.approx(0.5) and out["cos_random"] == pytest.approx(0.25)
    assert out["top1"] == pytest.approx(0.5)  # row 0 finds image 0; row 1's nearest is image 1, not its own
    assert chance_top_k(hits, 1) == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert chance_top_k(hits, 2) == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)


def test_the_cli_trains_resumes_and_refuses_another_clip(tiny_shapes, tiny_clip_run, tmp_path, capsys):
    run = tmp_path / "p"
    args = ["train", "prior", "--clip", str(tiny_clip_run[0]), "--data", str(tiny_shapes), "--out", str(run),
            "--quiet", "--set", "model.width=32", "--set", "model.layers=1", "--set", "model.heads=2",
            "--set", "sample.steps=4", "--set", "train.batch_size=16", "--set", "train.checkpoint_every=5"]
    assert main(args + ["--steps", "5"]) == 0
    assert main(args + ["--steps", "8", "--resume"]) == 0
    assert "resumed from" in (run / "log.txt").read_text()
    assert "held-out" in capsys.readouterr().out
    config = json.loads((run / "prior" / "config.json").read_text())
    config["clip_fingerprint"] = "0" * 16
    (run / "prior" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CarraraError, match="not the one this prior was trained on"):
        Prior.load(run)
    assert main(["train", "prior", "--data", str(tiny_shapes), "--out", str(tmp_path / "q"), "--quiet"]) == 2
    assert "--clip" in capsys.readouterr().err
