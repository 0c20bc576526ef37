"""The generative families (carrara/families/): each learns on tiny data, samples deterministically per seed,
and the parts the papers define exactly are checked against hand-computed or numerical references."""
import json

import pytest
import torch
from safetensors.torch import load_file

from carrara.data.load import load_dataset, preload_images
from carrara.errors import CarraraError
from carrara.families import Batch, build, family
from carrara.families.ar import GPT, GPTConfig, sample_tokens
from carrara.families.flow import Config as FlowConfig
from carrara.families.flow import Glow, squeeze, unsqueeze
from carrara.families.igpt import kmeans
from carrara.families.pipeline import FamilyPipeline
from carrara.families.train import FamilyRecipe, train_family
from carrara.families.vqvae import Config as VQConfig
from carrara.families.vqvae import Quantizer, codebook_usage
from carrara.text.encoder import TextEncoder
from carrara.train.core import TrainConfig

SIZE = 16
TINY_GPT = {"n_layer": 1, "n_head": 2, "n_embd": 32}
TINY_VQ = {"base_channels": 8, "codebook_size": 16, "code_dim": 8, "image_size": SIZE}
TINY = {  # model overrides per family: a few thousand parameters each
    "vae": {"base_channels": 8, "z_dim": 8, "cond_width": 16, "image_size": SIZE},
    "vqvae": TINY_VQ,
    "ar": {"vqvae": TINY_VQ, "gpt": TINY_GPT},
    "igpt": {"grid": 8, "palette_size": 8, "gpt": TINY_GPT, "image_size": SIZE},
    "flow": {"levels": 2, "steps": 2, "hidden": 16, "cond_channels": 4, "image_size": SIZE},
    "gan": {"base_channels": 8, "z_dim": 8, "cond_width": 16, "image_size": SIZE},
}
GENERATORS = ("vae", "ar", "igpt", "flow", "gan")


@pytest.fixture(scope="module")
def shapes_data(tiny_shapes):
    """tiny_shapes as uint8 (48, 3, 16, 16) and the pooled MiniLM embeddings of their captions (48, 384)."""
    images, texts = preload_images(load_dataset(str(tiny_shapes), size=SIZE), progress=False)
    return images, TextEncoder.load("minilm").pooled(texts)


def fitted(kind, images, cond, steps, lr=3e-3, seed=0):
    """A tiny model of `kind`, initialised on the data and trained `steps` steps; returns (model, data, losses)."""
    torch.manual_seed(seed)
    module = family(kind)
    model = build(kind, TINY[kind])
    module.initialize(model, images, cond)
    data = module.prepare(model, images)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.5, 0.999))
    losses = []
    for step in range(steps):
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(step))[:16]
        loss = module.loss(model, Batch(data[idx], cond[idx], torch.Generator().manual_seed(step)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), data, losses


@pytest.mark.parametrize("kind", ["vae", "vqvae", "ar", "igpt", "flow"])
def test_the_loss_falls_on_tiny_shapes(kind, shapes_data):
    images, cond = shapes_data
    _, _, losses = fitted(kind, images, cond, steps=40)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)


def test_the_gan_generator_moves_towards_the_data(shapes_data):
    """A GAN's summed loss is no progress measure (gan.py): G's images must come to look like the data's —
    here their mean brightness, from mid-grey towards the black backgrounds of `shapes`."""
    images, cond = shapes_data
    real_mean = (images.float() / 127.5 - 1).mean()
    torch.manual_seed(0)
    before = family("gan").sample(build("gan", TINY["gan"]), cond, 0).mean()
    model, _, _ = fitted("gan", images, cond, steps=40, lr=2e-3)
    after = family("gan").sample(model, cond, 0).mean()
    assert abs(after - real_mean) < 0.5 * abs(before - real_mean), (float(before), float(after), float(real_mean))


@pytest.mark.parametrize("kind", GENERATORS)
def test_sampling_is_deterministic_per_seed_and_per_image(kind, shapes_data):
    images, cond = shapes_data
    torch.manual_seed(0)
    model = build(kind, TINY[kind])
    family(kind).initialize(model, images, cond)
    model.eval()
    a = family(kind).sample(model, cond[:3], 7)
    assert a.shape == (3, 3, SIZE, SIZE) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, family(kind).sample(model, cond[:3], 7))
    alone = family(kind).sample(model, cond[2:3], 9)  # image 2 of a batch at seed 7 is seed 9 alone
    assert torch.allclose(a[2:3], alone, atol=1e-5)
    assert not torch.equal(a, family(kind).sample(model, cond[:3], 8))


def random_glow() -> tuple[Glow, torch.Tensor]:
    """A 2-level flow on 3×4×4 inputs with every parameter random (no layer is the identity), and a caption."""
    torch.manual_seed(0)
    model = Glow(FlowConfig(image_size=4, levels=2, steps=2, hidden=8, cond_dim=5, cond_channels=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("convs.0.weight") and "convs" not in name:
                p.copy_(0.3 * torch.randn_like(p))
    return model, torch.randn(1, 5)


def test_squeeze_is_a_permutation_of_2x2_patches():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert squeeze(x)[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]  # the top-left patch, row-major
    assert torch.equal(unsqueeze(squeeze(x)), x)


def test_the_flow_inverse_inverts_its_forward():
    model, cond = random_glow()
    y = torch.rand(1, 3, 4, 4) - 0.5
    with torch.no_grad():
        zs, _, _ = model.encode(y, cond)
        back = model.decode(zs, cond)
    assert (back - y).abs().max() < 1e-4


def test_the_flow_log_determinant_matches_the_numerical_jacobian():
    model, cond = random_glow()
    model = model.double()
    cond = cond.double()
    y = (torch.rand(1, 3, 4, 4) - 0.5).double()

    def f(flat):
        zs, _, _ = model.encode(flat.view(1, 3, 4, 4), cond)
        return torch.cat([z.flatten() for z in zs])  # (48,)

    jacobian = torch.autograd.functional.jacobian(f, y.flatten())  # (48, 48)
    with torch.no_grad():
        _, logdet, _ = model.encode(y, cond)
    assert torch.allclose(logdet[0], torch.linalg.slogdet(jacobian)[1], atol=1e-8)
    assert abs(float(logdet[0])) > 1.0  # a real volume change, not a vacuous 0 = 0


def hand_quantizer(**changes) -> Quantizer:
    """Codebook e_0 = (0, 0), e_1 = (1, 1)."""
    q = Quantizer(VQConfig(codebook_size=2, code_dim=2, beta=0.25, **changes))
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        q.ema_sum.copy_(q.codebook)
    return q


def test_vq_straight_through_gradient_by_hand():
    """z_e = (0.9, 0.8) → e_1. Loss Σ w·z_q + L_vq with w = (2, 3): the decoder's gradient w reaches z_e
    unchanged (straight-through); commitment adds β(z_e − e)·2/2 = (−0.025, −0.05); the codebook loss
    moves e_1 only, by (e_1 − z_e)·2/2 = (0.1, 0.2)."""
    q = hand_quantizer(ema=False)
    z_e = torch.tensor([0.9, 0.8]).view(1, 2, 1, 1).requires_grad_(True)
    z_q, codes, vq_loss = q(z_e)
    assert codes.tolist() == [[[1]]] and z_q.flatten().tolist() == [1.0, 1.0]
    assert abs(vq_loss.item() - (0.25 * 0.05 / 2 + 0.05 / 2)) < 1e-7
    ((torch.tensor([2.0, 3.0]).view(1, 2, 1, 1) * z_q).sum() + vq_loss).backward()
    assert torch.allclose(z_e.grad.flatten(), torch.tensor([1.975, 2.95]), atol=1e-6)
    assert torch.allclose(q.codebook.grad, torch.tensor([[0.0, 0.0], [0.1, 0.2]]), atol=1e-6)


def test_vq_ema_codebook_update_by_hand():
    """γ = 0.75, no smoothing; z = (0.9, 0.8), (1.1, 1.0) → e_1 and (0.1, −0.1) → e_0, from N = (1, 1), m = e:
    N = ¾(1, 1) + ¼(1, 2) = (1, 1.25); m_0 = ¼(0.1, −0.1); m_1 = ¾(1, 1) + ¼(2.0, 1.8) = (1.25, 1.2); e = m / N."""
    q = hand_quantizer(ema=True, decay=0.75, eps=0.0)
    z_e = torch.tensor([[0.9, 1.1, 0.1], [0.8, 1.0, -0.1]]).view(1, 2, 1, 3)
    q.eval()
    q(z_e)
    assert torch.equal(q.codebook, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))  # no update outside training
    q.train()
    _, codes, _ = q(z_e)
    assert codes.flatten().tolist() == [1, 1, 0]
    assert torch.allclose(q.ema_count, torch.tensor([1.0, 1.25]))
    assert torch.allclose(q.codebook, torch.tensor([[0.025, -0.025], [1.0, 0.96]]), atol=1e-6)


def test_vq_ema_counts_are_laplace_smoothed():
    """A code never used keeps a finite vector: Ñ_i = (N_i + ε) / (n + Kε) · n, never 0."""
    q = hand_quantizer(ema=True, decay=0.5, eps=1e-5)
    q.train()
    for _ in range(200):  # only e_1 is ever chosen: N_0 decays to 2^−200 ≈ 0
        q(torch.tensor([1.0, 1.0]).view(1, 2, 1, 1))
    _, codes, _ = q(torch.tensor([1.0, 1.0]).view(1, 2, 1, 1))
    assert codes.item() == 1 and q.ema_count[1] == 1.0  # e_1 chosen every time (a NaN e_0 would win argmin)
    assert torch.allclose(q.codebook, torch.tensor([[0.0, 0.0], [1.0, 1.0]]), atol=1e-6)


def test_codebook_usage_counts_codes_and_perplexity():
    usage = codebook_usage(torch.tensor([0, 0, 1, 1]), 4)
    assert usage["codes_used"] == 2 and usage["usage"] == 0.5 and usage["perplexity"] == 2.0


def test_kmeans_palette_finds_the_colours():
    colours = torch.tensor([[-1.0, -1.0, -1.0], [1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])
    counts = torch.tensor([960, 20, 20])  # a black background and two rare colours, as on `shapes`
    points = colours.repeat_interleave(counts, 0) + 0.01 * torch.randn(1000, 3, generator=torch.Generator().manual_seed(0))
    for seed in range(5):
        found = kmeans(points, 3, seed=seed)
        assert torch.cdist(colours, found).min(1).values.max() < 0.05, seed


def test_ar_sampling_at_temperature_zero_is_greedy_decoding():
    """T → 0 (and top-k = 1) of the cached sampler equal argmax decoding recomputed from scratch each step."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=7, seq_len=10, n_prefix=2, n_layer=2, n_head=2, n_embd=16, cond_dim=5)).eval()
    cond = torch.randn(3, 5)
    tokens = torch.zeros(3, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(10):
            tokens = torch.cat([tokens, gpt(cond, tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(sample_tokens(gpt, cond, 0, temperature=1e-6), tokens)
    assert torch.equal(sample_tokens(gpt, cond, 5, temperature=0.0), tokens)
    assert torch.equal(sample_tokens(gpt, cond, 5, top_k=1), tokens)
    assert not torch.equal(sample_tokens(gpt, cond, 0, temperature=1.0), tokens)


def test_the_transformer_is_causal():
    """Changing token j changes no logit before j's own position (teacher forcing sees only the past)."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=7, seq_len=8, n_prefix=2, n_layer=2, n_head=2, n_embd=16, cond_dim=5)).eval()
    cond, tokens = torch.randn(1, 5), torch.randint(0, 7, (1, 8))
    changed = tokens.clone()
    changed[0, 5] = (tokens[0, 5] + 1) % 7
    with torch.no_grad():
        a, b = gpt(cond, tokens), gpt(cond, changed)  # (1, 2 + 8, 7)
    assert torch.allclose(a[:, :2 + 5], b[:, :2 + 5]) and not torch.allclose(a[:, 2 + 5:], b[:, 2 + 5:])


def test_ar_guidance_one_is_the_conditional_sampler():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=7, seq_len=6, n_prefix=2, n_layer=1, n_head=2, n_embd=16, cond_dim=5)).eval()
    cond, null = torch.randn(2, 5), torch.randn(2, 5)
    plain = sample_tokens(gpt, cond, 3)
    assert torch.equal(sample_tokens(gpt, cond, 3, guidance=1.0, uncond=null), plain)
    assert not torch.equal(sample_tokens(gpt, cond, 3, guidance=8.0, uncond=null), plain)


def tiny_recipe(kind, data, **changes) -> FamilyRecipe:
    train = TrainConfig(steps=6, batch_size=8, lr=2e-3, warmup_steps=1, log_every=2, checkpoint_every=3,
                        sample_every=6, bf16=False)
    return FamilyRecipe(kind=kind, data=str(data), size=SIZE, model=dict(TINY[kind]), train=train,
                        sample_prompts=["a red circle", "a blue square"], **changes)


def test_train_family_makes_a_resumable_run_that_generates(tiny_shapes, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train_family(tiny_recipe("vae", tiny_shapes), full, progress=False)
    train_family(tiny_recipe("vae", tiny_shapes), part, progress=False, stop_at=3)
    result = train_family(tiny_recipe("vae", tiny_shapes), part, progress=False, resume=True)
    a, b = load_file(full / "family.safetensors"), load_file(part / "family.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume is exact
    for name in ("config.json", "log.txt", "loss.png", "metrics.jsonl", "family.json", "samples/step_0000006.png"):
        assert (full / name).is_file(), name
    assert json.loads((full / "config.json").read_text())["stage"] == "family"
    meta = json.loads((full / "family.json").read_text())
    assert meta["kind"] == "vae" and meta["report"]["neg_elbo_nats_per_dim"] == result["report"]["neg_elbo_nats_per_dim"]
    pipe = FamilyPipeline.load(full)
    x = pipe(["a red circle", "a blue square"], seed=4, output="tensor", steps=20, sampler="dpmpp", guidance=4.0)
    assert x.shape == (2, 3, SIZE, SIZE)
    assert torch.allclose(x[1:], pipe(["a blue square"], seed=5, output="tensor"), atol=1e-5)  # image i: seed + i
    assert [im.size for im in pipe("a red circle")] == [(SIZE, SIZE)]


def test_the_ar_prior_trains_on_a_vqvae_run_and_generates_alone(tiny_shapes, tmp_path):
    vq, prior = tmp_path / "vq", tmp_path / "ar"
    train_family(tiny_recipe("vqvae", tiny_shapes), vq, progress=False)
    usage = json.loads((vq / "family.json").read_text())["report"]
    assert 1 <= usage["codes_used"] <= 16 and 1.0 <= usage["perplexity"] <= 16
    with pytest.raises(CarraraError, match="vqvae"):
        FamilyPipeline.load(vq)("a red circle")
    recipe = tiny_recipe("ar", tiny_shapes, vqvae=str(vq))
    recipe.model = {"gpt": TINY_GPT}
    train_family(recipe, prior, progress=False)
    meta = json.loads((prior / "family.json").read_text())
    assert meta["config"]["vqvae"]["codebook_size"] == 16 and meta["config"]["gpt"]["seq_len"] == 16
    x = FamilyPipeline.load(prior)(["a red circle"], seed=1, output="tensor")
    assert x.shape == (1, 3, SIZE, SIZE)


def test_user_errors_are_one_line(tiny_shapes, tmp_path):
    with pytest.raises(CarraraError, match="unknown family 'pixelcnn'"):
        FamilyRecipe(kind="pixelcnn")
    with pytest.raises(CarraraError, match="--vqvae RUN"):
        train_family(tiny_recipe("ar", tiny_shapes), tmp_path / "ar", progress=False)
    recipe = tiny_recipe("vae", tiny_shapes)
    recipe.model["depth"] = 3
    with pytest.raises(CarraraError, match="no field 'depth'"):
        train_family(recipe, tmp_path / "vae", progress=False)
    with pytest.raises(CarraraError, match="not a family run"):
        FamilyPipeline.load(tmp_path)


def test_the_cli_trains_a_family_and_generates_from_it(tiny_shapes, tmp_path, capsys):
    """`carrara train family` makes a run that `carrara generate --model` and `carrara eval` load like a diffusion model."""
    from PIL import Image

    from carrara.cli import main
    from carrara.png import read_png_metadata

    run = tmp_path / "vae"
    assert main(["train", "family", "--kind", "vae", "--data", str(tiny_shapes), "--size", str(SIZE), "--out", str(run),
                 "--steps", "3", "--batch-size", "4", "--quiet", "--set", "train.warmup_steps=1"]) == 0
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(run), "--quiet", "-o", str(out)]) == 0
    assert Image.open(out).size == (SIZE, SIZE) and read_png_metadata(out)["family"] == "vae"
    assert main(["generate", "--from", str(out), "--quiet", "-o", str(tmp_path / "again.png")]) == 0
    assert Image.open(out).tobytes() == Image.open(tmp_path / "again.png").tobytes()
    capsys.readouterr()
    assert main(["generate", "a red circle", "--model", str(run), "--precision", "int8", "-o", str(tmp_path / "q.png")]) == 2
    assert "is a family model, which runs in fp32" in capsys.readouterr().err and not (tmp_path / "q.png").exists()
    assert main(["train", "family", "--kind", "nope", "--data", str(tiny_shapes), "--out", str(tmp_path / "n")]) == 2
    assert "unknown family 'nope'" in capsys.readouterr().err
