"""Classifier guidance (Dhariwal & Nichol 2021): the noise-aware classifier, its gradient against finite differences,
Algorithms 1 (DDPM) and 2 (DDIM) written out by hand, `carrara train classifier` and `carrara generate --classifier`."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli_generate import gen, one_error_line, write_tiny_model
from test_learned_variance import LearnedModel

from carrara.cli import main
from carrara.data.shapes import build_shapes
from carrara.diffusion.guidance import classifier_gradient, classifier_guided_model
from carrara.diffusion.objectives import learned_range_log_variance, split_variance, step_betas, to_x0_eps
from carrara.diffusion.samplers import default_timesteps, sample_ddim, sample_ddpm
from carrara.diffusion.schedule import NoiseSchedule
from carrara.errors import CarraraError
from carrara.models.classifier import ClassifierConfig, NoiseAwareClassifier
from carrara.png import read_png_metadata
from carrara.train.classifier import IGNORE, shape_labels

HEADS = {"shape": ["circle", "star", "cross"], "color": ["red", "blue"]}
RELATIONS = ["left of", "right of", "above", "below"]


def tiny_classifier(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    config = ClassifierConfig(in_channels=3, sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                              head_channels=8, heads=HEADS, relations=RELATIONS)
    model = NoiseAwareClassifier(config).to(dtype).eval()
    with torch.no_grad():  # O(1) logits, so the log-probabilities and their gradients are far from flat
        for p in model.heads.parameters():
            p.mul_(20)
    return model


def test_scene_classes_name_one_objects_attributes_and_both_relations_of_a_pair():
    model = tiny_classifier()
    one = {"shape": "star", "color": "blue", "size": "large", "position": "left"}
    assert model.scene_classes([one], None) == {"shape": 1, "color": 1}  # the heads it has: no size or position
    assert model.scene_classes([{**one, "shape": "square"}], None) == {"color": 1}  # a shape it does not know
    pair = [{**one, "color": "red"}, {**one, "color": "blue"}]
    assert model.scene_classes(pair, "below") == {"relation": [(0, 3), (1, 2)]}  # red below blue, blue above red
    assert model.scene_classes(pair, "left of") == {"relation": [(0, 0), (1, 1)]}


def test_prompt_classes_read_what_the_prompt_names():
    model = tiny_classifier()
    assert model.prompt_classes("a blue cross, small, at the top") == {"shape": 2, "color": 1}
    # a pair: both objects' relations, by colour (red left of blue, blue right of red)
    assert model.prompt_classes("a red star to the left of a blue circle") == {"relation": [(0, 0), (1, 1)]}
    assert model.prompt_classes("a blue star below a red circle") == {"relation": [(1, 3), (0, 2)]}
    assert model.describe(model.prompt_classes("a blue star below a red circle")) == \
        "relation[blue]=below,relation[red]=above"
    assert model.describe({"shape": 1, "color": 0, "relation": (1, 0)}) == "shape=star,color=red,relation[blue]=left of"
    for text in ("shape=star,color=red", "relation[red]=left of,relation[blue]=right of", "color=blue,relation=above"):
        assert model.parse_classes(model.describe(model.parse_classes(text))) == model.parse_classes(text)
    assert model.parse_classes("relation[blue]=below,relation[red]=above") == {"relation": [(1, 3), (0, 2)]}
    with pytest.raises(CarraraError, match="not a colour this classifier knows; choose one of red, blue"):
        model.parse_classes("relation[green]=above")
    with pytest.raises(CarraraError, match="unknown attribute 'shape\\[red\\]'"):
        model.parse_classes("shape[red]=star")
    for prompt, message in [("a happy kitty", "names no object to guide toward"),
                            ("a red star left of a red circle", "names red twice"),
                            ("a large square", "has no head for what 'a large square' names"),
                            ("a green star left of a red circle", "has no head for")]:  # no green in its heads
        with pytest.raises(CarraraError, match=message):
            model.prompt_classes(prompt)


def test_log_prob_each_is_each_images_own_classes_from_the_logits():
    """One forward pass, image i scored for its own classes: the sum of the heads' log-softmax at them, written out
    from the logits; a list of relations sums each pair's term; log_prob is the same classes for every image."""
    model = tiny_classifier()
    x, t = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([10, 500, 900])
    wanted = [{"shape": 1, "color": 0}, {"shape": 2}, {"color": 1, "relation": [(1, 3), (0, 2)]}]
    got = model.log_prob_each(x, t, wanted)
    with torch.no_grad():
        log_p = {k: v.log_softmax(-1) for k, v in model(x, t).items()}
    expected = torch.stack([log_p["shape"][0, 1] + log_p["color"][0, 0], log_p["shape"][1, 2],
                            log_p["color"][2, 1] + log_p["relation"][2, 1, 3] + log_p["relation"][2, 0, 2]])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.log_prob(x, t, {"relation": (1, 3)}), log_p["relation"][:, 1, 3])
    with pytest.raises(CarraraError, match="2 sets of classes for 3 images"):
        model.log_prob_each(x, t, wanted[:2])


def test_gradient_matches_finite_differences():
    """∇_{x_t} log p_φ(y | x_t) by autograd equals central differences, and gradcheck passes, in float64."""
    model = tiny_classifier()
    wanted = model.parse_classes("shape=star,color=blue,relation=above")
    assert wanted == {"shape": 1, "color": 1, "relation": (1, 2)}
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([10, 700])

    def log_prob(x_, t_):
        return model.log_prob(x_, t_, wanted)

    grad = classifier_gradient(log_prob, x, t)
    assert grad.abs().max() > 1e-2
    h, picks = 1e-6, [(0, 0, 0, 0), (0, 2, 5, 3), (1, 1, 7, 7), (1, 0, 4, 1)]
    for idx in picks:
        e = torch.zeros_like(x)
        e[idx] = h
        fd = (log_prob(x + e, t) - log_prob(x - e, t))[idx[0]] / (2 * h)
        assert fd.item() == pytest.approx(grad[idx].item(), rel=1e-6, abs=1e-9)
    assert torch.autograd.gradcheck(lambda x_: log_prob(x_, t), x[:1].clone().requires_grad_(True))


def test_gradient_inside_inference_mode():
    """The pipeline samples under torch.inference_mode: the classifier's gradient is still taken, and is the same."""
    model = tiny_classifier(dtype=torch.float32)
    wanted = model.parse_classes("color=red")
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([5, 5])
    expected = classifier_gradient(lambda a, b: model.log_prob(a, b, wanted), x, t)
    with torch.inference_mode():
        x_inf = x.clone()
        got = classifier_gradient(lambda a, b: model.log_prob(a, b, wanted), x_inf, t)
    assert torch.equal(got, expected)


def _log_prob(x, t):
    """A closed-form "classifier": log p(y | x_t) = −‖x_t − m‖² / 2 + const, so ∇ = m − x_t."""
    return -((x - 0.3) ** 2).flatten(1).sum(1) / 2


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_algorithm_2_ddim_by_hand(pt):
    """DDIM on the guided model = DDIM written out with ε̂ = ε_θ − √(1 − ᾱ_t) s ∇ log p (Algorithm 2)."""
    schedule, s = NoiseSchedule.from_config("linear", prediction_type=pt), 2.0
    model, x_T = LearnedModel(schedule), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    ts = default_timesteps("ddim", schedule, 8)
    ours = sample_ddim(classifier_guided_model(model, _log_prob, s, schedule), x_T, schedule, ts)
    x = x_T
    for t, nxt in zip(ts, [*ts[1:], -1]):
        a_t, a_s = schedule.alphas_cumprod[t].item(), (schedule.alphas_cumprod[nxt].item() if nxt >= 0 else 1.0)
        out, _ = split_variance(model(x, torch.full((2,), t)), x)
        _, eps = to_x0_eps(out, x, a_t, pt)
        eps = eps - math.sqrt(1 - a_t) * s * (0.3 - x)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
    assert (ours - x).abs().max() <= 1e-4 * max(1.0, x.abs().max().item())
    plain = sample_ddim(model, x_T, schedule, ts)
    assert (plain - ours).abs().max() > 0.1


@pytest.mark.parametrize("learned", [False, True])
def test_algorithm_1_ddpm_by_hand(learned):
    """DDPM on the guided model = Algorithm 1 written out: x_{t−1} ~ N(μ + s Σ ∇ log p, Σ) on respaced steps, Σ the
    step's β̃ or the learned Σθ."""
    schedule, s = NoiseSchedule.from_config("cosine"), 3.0
    full = LearnedModel(schedule)
    model = full if learned else (lambda x, t: full(x, t)[:, :3])
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    ts = default_timesteps("ddpm", schedule, 10)
    guided = classifier_guided_model(model, _log_prob, s, schedule, ddpm_timesteps=ts)
    ours = sample_ddpm(guided, x_T, schedule, ts, generator=torch.Generator().manual_seed(5))
    g, x = torch.Generator().manual_seed(5), x_T
    for t, nxt in zip(ts, [*ts[1:], -1]):
        a_t, a_s = schedule.alphas_cumprod[t].item(), (schedule.alphas_cumprod[nxt].item() if nxt >= 0 else 1.0)
        beta, beta_tilde = step_betas(a_t, a_s)
        out, v = split_variance(model(x, torch.full((2,), t)), x)
        _, eps = to_x0_eps(out, x, a_t, "epsilon")
        mu = (x - beta / math.sqrt(1 - a_t) * eps) / math.sqrt(1 - beta)
        if nxt < 0:  # the last step: no noise, Σ = 0
            x = mu
            continue
        var = beta_tilde if v is None else learned_range_log_variance(v, math.log(beta), math.log(beta_tilde)).exp()
        x = mu + s * var * (0.3 - x) + var**0.5 * torch.randn(x.shape, generator=g)  # Algorithm 1, lines 4–5
    assert (ours - x).abs().max() <= 1e-4 * max(1.0, x.abs().max().item())
    algorithm_2 = sample_ddpm(classifier_guided_model(model, _log_prob, s, schedule), x_T, schedule, ts,
                              generator=torch.Generator().manual_seed(5))
    assert (algorithm_2 - ours).abs().max() > 1e-2  # Algorithm 2 moves the mean by s β/√α ∇ log p, not s Σ ∇ log p


def test_parse_classes_errors_name_the_valid_ones():
    model = tiny_classifier()
    with pytest.raises(CarraraError, match=r"unknown attribute 'colour'; this classifier knows shape, color, relation"):
        model.parse_classes("colour=red")
    with pytest.raises(CarraraError, match=r"choose one of circle, star, cross"):
        model.parse_classes("shape=hexagon")
    with pytest.raises(CarraraError, match="color="):
        model.parse_classes("relation=above")


def test_shape_labels_from_metadata(tmp_path):
    build_shapes(tmp_path, n=20, size=16, seed=3, progress=False)
    from carrara.data.load import load_dataset

    records = load_dataset(str(tmp_path)).records
    labels = shape_labels(records, relation=True)
    for i, r in enumerate(records):
        objects = r.extra["objects"]
        if len(objects) == 1:
            assert labels["shape"][i] != IGNORE and labels["relation"][i].eq(IGNORE).all()
            assert ["circle", "square", "triangle", "diamond", "star", "cross"][labels["shape"][i]] == objects[0]["shape"]
        else:
            assert labels["color"][i] == IGNORE
            rows = labels["relation"][i]
            assert (rows != IGNORE).sum() == 2  # one row per object's colour, inverse relations
            assert {int(v) for v in rows[rows != IGNORE]} in ({0, 1}, {2, 3})


def test_pair_shape_labels_and_classes_name_each_colours_shape(tmp_path):
    """The pair-shape head: on a two-object image, the row of each object's colour holds its shape; one-object
    images have none; scene_classes asks for both objects' shapes by colour, and log_prob_each sums those terms."""
    from carrara.data.load import load_dataset
    from carrara.models.classifier import PAIR_SHAPE
    from carrara.train.classifier import HEADS as SHAPES_HEADS

    build_shapes(tmp_path, n=30, size=16, seed=4, progress=False)
    records = load_dataset(str(tmp_path)).records
    labels = shape_labels(records, relation=True, pair_shapes=True)
    colors, kinds = SHAPES_HEADS["color"], SHAPES_HEADS["shape"]
    pairs = 0
    for i, r in enumerate(records):
        objects, row = r.extra["objects"], labels[PAIR_SHAPE][i]
        if len(objects) == 1:
            assert row.eq(IGNORE).all()
            continue
        pairs += 1
        assert {(colors[c], kinds[int(row[c])]) for c in range(len(colors)) if row[c] != IGNORE} == \
            {(o["color"], o["shape"]) for o in objects}
    assert pairs >= 5

    torch.manual_seed(0)
    model = NoiseAwareClassifier(ClassifierConfig(in_channels=3, sample_size=8, block_out_channels=(8, 16),
                                                  norm_num_groups=4, head_channels=8, heads=dict(SHAPES_HEADS),
                                                  relations=RELATIONS, pair_shapes=True)).double().eval()
    pair = [{"shape": "star", "color": "red"}, {"shape": "circle", "color": "blue"}]
    wanted = model.scene_classes(pair, "above")
    assert wanted == {"relation": [(0, 2), (5, 3)], PAIR_SHAPE: [(0, 4), (5, 0)]}
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([50, 700])
    with torch.no_grad():
        log_p = {k: v.log_softmax(-1) for k, v in model(x, t).items()}
    assert log_p[PAIR_SHAPE].shape == (2, len(colors), len(kinds))
    expected = log_p["relation"][:, 0, 2] + log_p["relation"][:, 5, 3] + log_p[PAIR_SHAPE][:, 0, 4] + \
        log_p[PAIR_SHAPE][:, 5, 0]
    torch.testing.assert_close(model.log_prob_each(x, t, [wanted, wanted]), expected)
    with pytest.raises(CarraraError, match="pair-shape head needs"):
        ClassifierConfig(heads={"color": ["red", "blue"]}, pair_shapes=True)


@pytest.fixture(scope="module")
def classifier_run(tiny_ae_run, tmp_path_factory):
    """`carrara train classifier` for 150 steps on 300 tiny shapes (70 % one object); a few seconds."""
    data = tmp_path_factory.mktemp("shapes300")
    build_shapes(data, n=300, size=16, seed=1, progress=False, two_object_fraction=0.3)
    out = tmp_path_factory.mktemp("clf")
    assert main(["train", "classifier", "--data", str(data), "--autoencoder", str(tiny_ae_run), "--out", str(out),
                 "--size", "16", "--steps", "150", "--batch-size", "32", "--quiet",
                 "--set", "model.block_out_channels=[32,64]", "--set", "model.norm_num_groups=8",
                 "--set", "model.head_channels=16", "--set", "holdout=60", "--set", "train.lr=0.002",
                 "--set", "train.warmup_steps=10", "--set", "train.ema_decay=0.99", "--set", "train.bf16=false",
                 "--set", "train.checkpoint_every=1000"]) == 0
    return out


def test_tiny_classifier_beats_chance(classifier_run, capsys):
    """Held-out accuracy (60 images) at t = 0 after 150 steps: position and size well above chance (20 %, 50 %)."""
    log = (classifier_run / "log.txt").read_text()
    line = [s for s in log.splitlines() if s.startswith("held-out accuracy")][-1]
    accuracy = json.loads(line.split("by t: ", 1)[1])  # {t: {head: share}}
    assert accuracy["0"]["position"] >= 0.6 and accuracy["0"]["size"] >= 0.75, accuracy
    assert accuracy["750"]["position"] < accuracy["0"]["position"]  # noise makes it harder: it reads x_t, not x0
    assert (classifier_run / "classifier" / "config.json").is_file()
    assert json.loads((classifier_run / "classifier" / "scheduler_config.json").read_text())["beta_schedule"] == \
        "scaled_linear"


def test_classifier_trains_in_pixel_space(tmp_path):
    """--autoencoder pixels (Imagen's route): the classifier reads noisy pixels (3 channels) and learns the position."""
    build_shapes(tmp_path / "d", n=200, size=16, seed=2, progress=False, two_object_fraction=0.0)
    assert main(["train", "classifier", "--data", str(tmp_path / "d"), "--autoencoder", "pixels", "--out",
                 str(tmp_path / "c"), "--size", "16", "--steps", "200", "--batch-size", "32", "--quiet",
                 "--set", "model.block_out_channels=[32,64,64]", "--set", "model.norm_num_groups=8",
                 "--set", "model.head_channels=16", "--set", "holdout=50", "--set", "train.lr=0.002",
                 "--set", "train.warmup_steps=10", "--set", "train.ema_decay=0.99", "--set", "train.bf16=false",
                 "--set", "train.checkpoint_every=1000", "--set", "relation=false"]) == 0
    assert json.loads((tmp_path / "c" / "classifier" / "config.json").read_text())["in_channels"] == 3
    line = [s for s in (tmp_path / "c" / "log.txt").read_text().splitlines() if s.startswith("held-out accuracy")][-1]
    assert json.loads(line.split("by t: ", 1)[1])["0"]["position"] >= 0.6


def test_generate_with_classifier_guidance(classifier_run, tmp_path, capsys):
    model = write_tiny_model(tmp_path / "model")
    out = tmp_path / "guided.png"
    assert gen(model, "a shape", "--classifier", str(classifier_run), "--classes", "position=left,size=large",
               "--classifier-scale", "5", "-o", str(out), "--quiet") == 0
    meta = read_png_metadata(out)
    assert meta["classifier"]["classes"] == "position=left,size=large" and meta["classifier"]["scale"] == 5
    plain = tmp_path / "plain.png"
    assert gen(model, "a shape", "-o", str(plain), "--quiet") == 0
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (out, plain))
    assert np.abs(a - b).max() > 0  # the guidance moved the sample


def test_generate_guides_toward_the_prompt_without_classes(classifier_run, tmp_path, capsys):
    """No --classes: the classes are the prompt's, so the image is the one --classes naming them makes."""
    model = write_tiny_model(tmp_path / "model")
    prompt = "a large red star on the left"
    read, named = tmp_path / "read.png", tmp_path / "named.png"
    assert gen(model, prompt, "--classifier", str(classifier_run), "--classifier-scale", "5", "-o", str(read),
               "--quiet") == 0
    assert gen(model, prompt, "--classifier", str(classifier_run), "--classifier-scale", "5", "--classes",
               "shape=star,color=red,size=large,position=left", "-o", str(named), "--quiet") == 0
    assert read_png_metadata(read)["classifier"]["classes"] == "shape=star,color=red,size=large,position=left"
    assert read_png_metadata(read)["classifier"]["classes_from"] == "prompt"
    np.testing.assert_array_equal(np.asarray(Image.open(read)), np.asarray(Image.open(named)))
    for prompt, message in [("a happy kitty", "names no object to guide toward; give --classes"),
                            ("", "an empty prompt (the unconditional model) needs --classes")]:
        assert gen(model, prompt, "--classifier", str(classifier_run), "-o", str(tmp_path / "x.png")) == 2
        assert message in one_error_line(capsys)
        assert not (tmp_path / "x.png").exists()


def test_classes_name_each_object_of_a_pair_by_colour_and_from_remakes_a_guided_image(classifier_run, tmp_path,
                                                                                         capsys):
    """--classes "relation[red]=…,pair_shape[red]=…" asks for a pair on the command line (what the prompt gives);
    the PNG records the classes in that form, and --from makes the same image again, or says the run is gone."""
    model = write_tiny_model(tmp_path / "model")
    prompt = "a red circle to the left of a blue square"
    common = ["--classifier", str(classifier_run), "--classifier-scale", "4", "--quiet"]
    read, named = tmp_path / "read.png", tmp_path / "named.png"
    assert gen(model, prompt, *common, "-o", str(read)) == 0
    classes = read_png_metadata(read)["classifier"]["classes"]
    assert classes == ("relation[red]=left of,relation[blue]=right of,pair_shape[red]=circle,"
                       "pair_shape[blue]=square")
    assert gen(model, prompt, *common, "--classes", classes, "-o", str(named)) == 0
    pixels = lambda p: np.asarray(Image.open(p))
    np.testing.assert_array_equal(pixels(read), pixels(named))
    for made in (read, named):  # from the prompt, and from --classes
        again = tmp_path / f"again-{made.name}"
        assert main(["generate", "--from", str(made), "-o", str(again), "--quiet"]) == 0
        np.testing.assert_array_equal(pixels(made), pixels(again))
        assert read_png_metadata(again)["classifier"] == read_png_metadata(made)["classifier"]
    moved = tmp_path / "moved"
    classifier_run.rename(moved)
    try:
        assert main(["generate", "--from", str(read), "-o", str(tmp_path / "x.png")]) == 2
        assert "which is gone: pass --classifier RUN" in one_error_line(capsys)
    finally:
        moved.rename(classifier_run)
    assert not (tmp_path / "x.png").exists()
    from carrara.png import save_png

    meta = read_png_metadata(read)
    for bad in ("runs/clf", {"run": str(classifier_run), "classes": 3, "scale": 4},
                {"run": str(classifier_run), "classes": classes, "scale": True}):
        save_png(tmp_path / "bad.png", Image.open(read), {**meta, "classifier": bad})
        assert main(["generate", "--from", str(tmp_path / "bad.png"), "-o", str(tmp_path / "x.png")]) == 2
        assert "metadata field 'classifier' must be {run, classes, scale}" in one_error_line(capsys)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--classes", "colour=red"], "unknown attribute 'colour'; this classifier knows shape, color, size, position, "
                                  + "relation"),
    (["--classes", "color=magenta"], "choose one of red, orange, yellow, green, cyan, blue, purple, pink"),
    (["--classes", "relation=above"], "say of which object"),
])
def test_bad_classes_are_one_line_naming_the_valid_ones(classifier_run, tmp_path, capsys, argv, message):
    model = write_tiny_model(tmp_path / "model")
    assert gen(model, "a shape", "--classifier", str(classifier_run), *argv, "-o", str(tmp_path / "x.png")) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "x.png").exists()


def test_classifier_flags_need_a_classifier_and_the_same_schedule(classifier_run, tmp_path, capsys):
    model = write_tiny_model(tmp_path / "model")
    assert gen(model, "a shape", "--classes", "color=red", "-o", str(tmp_path / "x.png")) == 2
    assert "--classifier RUN" in one_error_line(capsys)
    scheduler = tmp_path / "model" / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "beta_schedule": "linear"}))
    assert gen(model, "a shape", "--classifier", str(classifier_run), "--classes", "color=red",
               "-o", str(tmp_path / "x.png")) == 2
    assert "learned the scaled_linear noise schedule, the model uses linear" in one_error_line(capsys)


def test_classifier_guided_pipe_guides_each_caption_toward_its_own_scene():
    """evaluate/faithfulness.ClassifierGuided: the guide it hands the pipeline scores image i for caption i's scene
    (both relations of a pair), on the caption itself or, unconditional, on the empty prompt; scale 0 guides nothing."""
    from carrara.evaluate.faithfulness import ClassifierGuided, caption_classes, sample_prompts
    from carrara.train.classifier import HEADS as SHAPES_HEADS

    torch.manual_seed(0)
    model = NoiseAwareClassifier(ClassifierConfig(in_channels=3, sample_size=8, block_out_channels=(8, 16),
                                                  norm_num_groups=4, head_channels=8, heads=dict(SHAPES_HEADS),
                                                  relations=RELATIONS)).double().eval()
    prompts = sample_prompts(3, 2, seed=0)
    classes = caption_classes(model, prompts)
    calls = []

    def pipe(texts, classifier=None, **settings):
        calls.append((texts, classifier, settings))
        return ["image"] * len(texts)

    texts = [text for _, text in prompts]
    assert ClassifierGuided(pipe, model, 3.0, classes)(texts, steps=2) == ["image"] * 3
    seen, guide, settings = calls[-1]
    assert seen == texts and guide.scale == 3.0 and settings == {"steps": 2}
    x, t = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([100, 100, 100])
    expected = [model.log_prob(x[i:i + 1], t[i:i + 1],
                               model.scene_classes(shapes_objects(scene), scene.relation)) for i, (scene, _) in
                enumerate(prompts)]
    torch.testing.assert_close(guide.log_prob(x, t), torch.cat(expected))
    assert all(len(classes[text]["relation"]) == 2 for text in texts)

    ClassifierGuided(pipe, model, 3.0, classes, conditional=False)(texts)
    assert calls[-1][0] == [""] * 3
    ClassifierGuided(pipe, model, 0.0, classes)(texts)
    assert calls[-1][1] is None


def shapes_objects(scene):
    from carrara.data.shapes import scene_metadata

    return scene_metadata(scene, 1)["objects"]


def test_eval_faithfulness_with_a_classifier(classifier_run, tmp_path, capsys):
    """`carrara eval faithfulness --classifier RUN --classifier-scale S` records the guide in its report; the flags'
    errors are one line."""
    model = write_tiny_model(tmp_path / "model")
    common = ["eval", "faithfulness", "--model", str(model), "--n", "2", "--steps", "2", "--quiet"]
    assert main([*common, "--classifier", str(classifier_run), "--classifier-scale", "4",
                 "--out", str(tmp_path / "guided.json")]) == 0
    assert "classifier guidance s=4 with" in capsys.readouterr().out
    report = json.loads((tmp_path / "guided.json").read_text())
    assert report["classifier"]["scale"] == 4 and report["classifier"]["run"] == str(classifier_run.resolve())
    assert report["two_objects"]["model"]["relation"]["n"] == 2

    assert main([*common, "--classifier-scale", "4"]) == 2
    assert "--classifier RUN" in one_error_line(capsys)
    scheduler = tmp_path / "model" / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "beta_schedule": "linear"}))
    assert main([*common, "--classifier", str(classifier_run), "--out", str(tmp_path / "x.json")]) == 2
    assert "learned the scaled_linear noise schedule, the model uses linear" in one_error_line(capsys)
    assert not (tmp_path / "x.json").exists()
