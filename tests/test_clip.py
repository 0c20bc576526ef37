"""carrara's evaluation CLIP: InfoNCE, CLIP score, caption-aware retrieval, and a tiny training run."""
import json

import pytest
import torch
import torch.nn.functional as F

from carrara.errors import CarraraError
from carrara.models.clip import ClipModel, ClipScorer, clip_loss, clip_score, retrieval
from carrara.text.encoder import mean_pool
from carrara.train.clip import random_shift, split_by_caption


def test_clip_loss_is_clips_symmetric_cross_entropy():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2  # CLIP paper, Fig. 3
    assert torch.allclose(clip_loss(img, txt, scale), expected, atol=1e-6)


def test_clip_loss_treats_repeated_captions_as_positives():
    img = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    txt = img.clone()  # items 0 and 1 share a caption and an embedding
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    s = torch.tensor(5.0)
    # Row 0 of the logits is (5, 5, 0); the target is (½, ½, 0): loss = log(2e^5 + 1) − 5, the same for rows 0, 1.
    row01 = torch.log(2 * torch.exp(s) + 1) - s
    row2 = torch.log(2 + torch.exp(s)) - s
    assert torch.allclose(clip_loss(img, txt, s, same), (2 * row01 + row2) / 3, atol=1e-6)


def test_clip_score_is_100_times_clipped_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    assert clip_score(a, b).tolist() == pytest.approx([100.0, 0.0, 60.0])


def test_retrieval_counts_captions_not_indices():
    texts = ["red", "red", "blue", "green"]
    table = {"red": [1.0, 0.0, 0.0], "blue": [0.0, 1.0, 0.0], "green": [0.0, 0.0, 1.0]}
    embed = lambda ts: torch.tensor([table[t] for t in ts])
    perfect = embed(texts)
    assert retrieval(perfect, texts, embed) == {"i2t_top1": 1.0, "t2i_top1": 1.0, "i2t_top5": 1.0, "t2i_top5": 1.0}
    # image 0 (captioned red) looks blue, image 2 (captioned blue) looks red but less so than image 1
    mixed = torch.tensor([[0.1, 0.9, 0.0], [1.0, 0.0, 0.0], [0.8, 0.2, 0.0], [0.0, 0.0, 1.0]])
    r = retrieval(mixed, texts, embed, ks=(1, 2))
    assert r["i2t_top1"] == 0.5  # images 1 and 3 find their caption first
    assert r["t2i_top1"] == pytest.approx(2 / 3)  # "red" → image 1 ✓, "green" → image 3 ✓, "blue" → image 0 ✗
    assert r["i2t_top2"] == 1.0 and r["t2i_top2"] == 1.0


def test_split_keeps_each_caption_on_one_side():
    texts = [f"caption {i % 40}" for i in range(200)]
    train, held = split_by_caption(texts, holdout=300, seed=0)
    assert len({texts[i] for i in held.tolist()}) == 8  # capped at 20 % of the 40 captions
    assert not {texts[i] for i in train.tolist()} & {texts[i] for i in held.tolist()}
    assert len(train) + len(held) == 200


def test_random_shift_moves_content_and_keeps_size():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1.0
    g = torch.Generator().manual_seed(1)
    y = random_shift(x, 2, g)
    assert y.shape == x.shape and y.sum() == 1.0
    assert random_shift(x, 0, g) is x


def test_sentence_embedding_is_the_masked_mean():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(states, mask, normalize=False).tolist() == [[2.0, 3.0]]


@pytest.fixture
def clip_run(tiny_clip_run):
    return tiny_clip_run


def test_clip_training_lowers_the_loss_and_writes_a_loadable_model(clip_run):
    run, result = clip_run
    losses = [json.loads(s)["loss"] for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
    saved = json.loads((run / "retrieval.json").read_text())["held_out"]
    assert saved == result["held_out"] and saved["n_captions"] >= 2
    scorer = ClipScorer.load(run)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    e = scorer.embed_images(images)
    assert e.shape == (3, 32) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_truncated_clip_weights_give_one_clear_error(clip_run, tmp_path):
    run, _ = clip_run
    (tmp_path / "config.json").write_bytes((run / "clip" / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes((run / "clip" / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CarraraError, match="cannot read the CLIP weights"):
        ClipModel.from_pretrained(tmp_path)
    with pytest.raises(CarraraError, match="not a CLIP folder"):
        ClipModel.from_pretrained(tmp_path / "nothing")


def test_a_128_px_clip_has_a_stride_2_stem_and_old_configs_keep_theirs():
    """A 128-px CLIP runs its blocks at 64² (stem stride 2, kernel 4: every pixel seen); a saved 64-px config without
    the key loads as before (stride 1), and an explicit stride is kept."""
    from carrara.models.clip import ClipConfig, ClipModel

    big = ClipConfig(image_size=128, channels=(8, 16), embed_dim=16, groups=4)
    assert big.stem_stride == 2
    stem = ClipModel(big).image_encoder.stem
    assert (stem.kernel_size, stem.stride) == ((4, 4), (2, 2))
    assert stem(torch.zeros(1, 3, 128, 128)).shape[-2:] == (64, 64)
    old = ClipConfig.from_dict({"image_size": 64, "channels": [8, 16], "embed_dim": 16, "groups": 4})
    assert old.stem_stride == 1 and ClipModel(old).image_encoder.stem.kernel_size == (3, 3)
    assert ClipConfig(image_size=128, stem_stride=1).stem_stride == 1
    saved = ClipConfig.from_dict({"image_size": 128, "channels": [8, 16], "embed_dim": 16, "groups": 4})
    assert saved.stem_stride == 1  # saved before the patchify stem: its weights are a stride-1 stem's
    odd = ClipModel(ClipConfig(image_size=192, channels=(8, 16), embed_dim=16, groups=4)).image_encoder.stem
    assert odd(torch.zeros(1, 3, 192, 192)).shape[-2:] == (64, 64)  # stride 3
    with pytest.raises(CarraraError, match="stem_stride"):
        ClipConfig(stem_stride=-1)
    # a one-pixel checker pattern and the flat grey it averages to are one image at 64 px, two at 128
    model = ClipModel(big).eval()
    fine = torch.zeros(1, 3, 128, 128)
    fine[..., 1::2, 1::2] = 1.0
    flat = torch.full_like(fine, 0.25)
    assert torch.allclose(F.avg_pool2d(fine, 2), F.avg_pool2d(flat, 2))
    assert (model.encode_image(fine) - model.encode_image(flat)).abs().max() > 1e-3
