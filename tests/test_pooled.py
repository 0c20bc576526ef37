"""The pooled sentence embedding as extra conditioning (Imagen §2.2): text side, U-Net side, training batches."""
import dataclasses

import pytest
import torch
from conftest import TINY_UNET, tiny_diffusion_recipe
from reference import randomize_, reference_pair

from carrara.diffusion.guidance import cfg_model
from carrara.errors import CarraraError
from carrara.models import UNet2DConditionModel, UNetConfig
from carrara.pipeline import Pipeline
from carrara.text.encoder import TextEncoder, mean_pool
from carrara.train.captions import Captions
from carrara.train.diffusion import EncodedData, init_from, make_batch, train_diffusion


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder.load("minilm")


POOLED = {**TINY_UNET, "sample_size": 8, "cross_attention_dim": 16, "class_embed_type": "projection",
          "projection_class_embeddings_input_dim": 12}


def test_mean_pool_is_the_sentence_transformers_embedding(minilm):
    """all-MiniLM-L6-v2's own pipeline (Transformer → mean Pooling → Normalize) gives the same vectors."""
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is the reference (test extra)")
    from carrara.text.encoder import minilm_path

    prompts = ["a happy kitty", "cat face", "a red sports car", ""]
    reference = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(prompts, convert_to_tensor=True)
    ours = minilm.pooled(prompts)  # (4, 384)
    assert ours.shape == (4, 384)
    torch.testing.assert_close(ours, reference.float(), atol=2e-5, rtol=0)


def test_pooled_embedding_puts_paraphrases_together(minilm):
    """The property the pooled vector is added for: "a happy kitty" is nearer "cat face" than "rocket"."""
    kitty, cat, rocket = minilm.pooled(["a happy kitty", "cat face", "rocket"])
    assert kitty @ cat > kitty @ rocket + 0.2


def test_mean_pool_ignores_padding():
    states = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.nn.functional.normalize(states[0, :2].mean(0), dim=0)
    torch.testing.assert_close(mean_pool(states, mask)[0], expected)
    states[0, 2:] = 1e6  # padding positions never reach the result
    torch.testing.assert_close(mean_pool(states, mask)[0], expected)


def test_projection_class_embedding_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    theirs, ours = reference_pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, UNetConfig, POOLED)
    g = torch.Generator().manual_seed(1)
    x, text, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g), torch.randn(2, 12, generator=g)
    t = torch.tensor([3, 917])
    with torch.no_grad():
        ref = theirs(x, t, text, class_labels=pooled).sample
        assert (ours(x, t, text, class_labels=pooled) - ref).abs().max() <= 1e-4
        assert (ours(x, t, text, class_labels=-pooled) - ref).abs().max() > 1e-2  # the pooled input is used


def test_pooled_config_is_checked():
    with pytest.raises(CarraraError, match="projection_class_embeddings_input_dim"):
        UNetConfig.from_diffusers_config({**POOLED, "projection_class_embeddings_input_dim": None})
    with pytest.raises(CarraraError, match="class_embed_type"):
        UNetConfig.from_diffusers_config({**POOLED, "class_embed_type": "simple_projection"})
    model = UNet2DConditionModel(UNetConfig.from_diffusers_config(POOLED))
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 5, 16))


def test_init_from_a_model_without_pooling_starts_as_that_model(tmp_path):
    """Fine-tuning adds the pooled MLP with a zero last layer: the new network equals the source at step 0."""
    source = randomize_(UNet2DConditionModel(UNetConfig.from_diffusers_config({**POOLED, "class_embed_type": None,
                                                                           "projection_class_embeddings_input_dim": None})))
    (tmp_path / "model").mkdir()
    source.save_pretrained(tmp_path / "model" / "unet")
    for part in ("vae", "scheduler"):
        (tmp_path / "model" / part).mkdir()
    (tmp_path / "model" / "vae" / "config.json").write_text("{}")
    (tmp_path / "model" / "scheduler" / "scheduler_config.json").write_text("{}")
    (tmp_path / "model" / "model_index.json").write_text("{}")
    new = randomize_(UNet2DConditionModel(UNetConfig.from_diffusers_config(POOLED)), seed=5)
    init_from(new, str(tmp_path / "model"))
    g = torch.Generator().manual_seed(2)
    x, text, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g), torch.randn(2, 12, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(new(x, [5, 600], text, class_labels=pooled), source(x, [5, 600], text))
    assert new.class_embedding.linear_1.weight.abs().sum() > 0  # only the last layer is zero: gradients flow


def encoded(n=6, variants=2, seed=0) -> EncodedData:
    g = torch.Generator().manual_seed(seed)
    u = n * variants
    captions = Captions(states=torch.arange(u, dtype=torch.bfloat16)[:, None, None].expand(u, 3, 2) + 1,
                        pooled=torch.arange(u, dtype=torch.float32)[:, None].expand(u, 2) + 1,
                        caption_of=torch.arange(u).reshape(n, variants), n_variants=torch.full((n,), float(variants)),
                        null_states=torch.zeros(1, 3, 2, dtype=torch.bfloat16), null_pooled=torch.zeros(1, 2))
    return EncodedData(mean=torch.randn(n, 4, 2, 2, generator=g), std=torch.rand(n, 4, 2, 2, generator=g) + 0.1,
                       scale=0.5, captions=captions)


def test_batch_latent_is_the_scaled_posterior_sample():
    data, idx = encoded(), torch.tensor([4, 1, 4])
    z0, _, _ = make_batch(data, idx, torch.Generator().manual_seed(3), 0.0)
    eps = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(3))  # the first draw is ε_z
    torch.testing.assert_close(z0, (data.mean[idx] + data.std[idx] * eps) * 0.5)


@pytest.mark.parametrize("dropout, low, high", [(0.0, 0, 0), (0.1, 0.07, 0.13), (0.999, 0.99, 1.0)])
def test_batch_captions_and_their_dropout(dropout, low, high):
    data = encoded()
    idx = torch.randint(0, 6, (2000,), generator=torch.Generator().manual_seed(0))
    _, states, pooled = make_batch(data, idx, torch.Generator().manual_seed(1), dropout)
    dropped = (states == 0).all(-1).all(-1)  # the empty prompt's states (all zero in this fixture)
    assert low <= dropped.float().mean().item() <= high
    assert torch.equal((pooled == 0).all(-1), dropped)  # states and pooled vector are dropped together
    caption = states[~dropped][:, 0, 0].long() - 1  # the fixture's states hold their caption's index + 1
    assert torch.equal(caption // 2, idx[~dropped])  # each kept caption is one of its own image's variants
    if dropout == 0.0:
        assert 0.4 < (caption % 2).float().mean() < 0.6  # both variants are drawn, evenly


def test_cfg_with_a_pooled_condition_pairs_each_part():
    def model(x, t, c):  # a linear "network" reading both parts of the condition
        states, pooled = c
        return x * states.mean((1, 2))[:, None, None, None] + pooled.sum(1)[:, None, None, None]

    x = torch.randn(2, 1, 2, 2)
    cond, uncond = (torch.randn(2, 3, 4), torch.randn(2, 5)), (torch.randn(1, 3, 4), torch.randn(1, 5))
    w = 3.0
    out = cfg_model(model, cond, uncond, w)(x, torch.tensor([7, 7]))
    u = model(x, None, tuple(p.expand(2, *p.shape[1:]) for p in uncond))
    torch.testing.assert_close(out, u + w * (model(x, None, cond) - u))


def test_trained_pooled_model_samples_through_the_pipeline(tiny_shapes, tiny_ae_run, tmp_path):
    """The stage trains a pooled U-Net end to end, and the pipeline feeds it the pooled vector of each prompt."""
    recipe = dataclasses.replace(tiny_diffusion_recipe(tiny_shapes, tiny_ae_run, steps=6), pooled=True,
                                 prediction_type="v_prediction")
    train_diffusion(recipe, tmp_path / "run", progress=False)
    pipe = Pipeline.load(tmp_path / "run", precision="fp32")
    assert pipe.unet.config.class_embed_type == "projection"
    a = pipe(["a red circle"], steps=2, output="latent")
    assert torch.equal(a, pipe(["a red circle"], steps=2, output="latent"))
    assert not torch.equal(a, pipe(["a blue square"], steps=2, output="latent"))


def test_caption_states_are_cached_in_the_run_folder(minilm, tmp_path, monkeypatch):
    """A resumed run reads the encoded captions back instead of running the text encoder again; a damaged cache
    file, or other captions, are encoded afresh."""
    from carrara.train.cache import encode_texts

    texts = ["a red circle", "cat face", "a red circle", "rocket"]
    states, pooled, index = encode_texts(minilm, texts, progress=False, cache_dir=tmp_path / "cache")
    (cached,) = list((tmp_path / "cache").iterdir())

    def refuse(prompts):
        raise AssertionError("the text encoder ran although its output is cached")

    monkeypatch.setattr(minilm, "encode", refuse)
    again = encode_texts(minilm, texts, progress=False, cache_dir=tmp_path / "cache")
    assert torch.equal(again[0], states) and torch.equal(again[1], pooled) and again[2] == index == [0, 1, 0, 2]
    with pytest.raises(AssertionError, match="text encoder ran"):  # other captions: another cache entry
        encode_texts(minilm, texts + ["snowman"], progress=False, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    cached.write_bytes(b"not a safetensors file")
    fresh = encode_texts(minilm, texts, progress=False, cache_dir=tmp_path / "cache")
    assert torch.equal(fresh[0], states)
