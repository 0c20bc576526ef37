"""Hostile input on session 8's commands (quantize, distill, the unCLIP manipulations, export unclip, train decoder,
search): each case ended in a traceback, a run that trained nonsense, or a folder left behind, and is now one
`carrara: error:` line before any work, with nothing written."""
import json
import shutil

import pytest
import test_distill
import test_int8
import test_unclip
from safetensors import safe_open
from safetensors.torch import save_file

from carrara.cli import main
from carrara.errors import CarraraError
from carrara.train.core import AT_LEAST_ONE, MAX_BATCH_SIZE, TrainConfig

colours, pixel_model, decoder_run, unclip_model = (test_unclip.colours, test_unclip.pixel_model,
                                                   test_unclip.decoder_run, test_unclip.unclip_model)
distilled, model_copy = test_distill.distilled, test_int8.model_copy  # a 6-step student; a copy of the tiny run


def one_error_line(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2, argv
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("carrara: error: "), err
    return err[0] + captured.out


def test_quantize_refuses_a_calibration_it_cannot_write_before_calibrating(model_copy, tmp_path, capsys):
    """Was: the whole calibration run, then IsADirectoryError."""
    (model_copy / "unet" / "int8_calibration.json").mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = one_error_line(["quantize", "--model", model_copy, "--prompts", prompts, "--n", "1"], capsys)
    assert "int8_calibration.json is a folder" in out and "calibrating" not in out


@pytest.mark.parametrize("flags", [["--variations", "red.png"], ["--interpolate", "red.png", "blue.png"],
                                   ["--variations", "red.png", "--text-diff", "a cat"]])
def test_prior_guidance_with_a_manipulation_is_refused(decoder_run, colours, flags, tmp_path, capsys):
    """Was: ignored in silence (even 1e9), as the manipulations embed pictures and never run the prior."""
    argv = ["generate", "--model", decoder_run[0], "--steps", "2", "--quiet", "-o", tmp_path / "x.png",
            "--prior-guidance", "1e9", *[str(colours / f) if f.endswith(".png") else f for f in flags]]
    assert "drop --prior-guidance" in one_error_line(argv, capsys)
    assert not list(tmp_path.iterdir())


def test_export_unclip_bad_out_and_index_are_one_line_and_leave_nothing(decoder_run, unclip_model, tmp_path, capsys):
    """Was: NotADirectoryError / AttributeError tracebacks, and a half-copied .OUT.tmp folder after a failed copy."""
    run, prior = decoder_run[0], unclip_model[1]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    export = ["export", "unclip", "--prior", prior, "--decoder"]
    assert "is not a folder" in one_error_line(export + [run, "--out", a_file / "model"], capsys)
    bad_index = tmp_path / "bad-index"
    shutil.copytree(run, bad_index)
    index = json.loads((bad_index / "model_index.json").read_text())
    (bad_index / "model_index.json").write_text(json.dumps({**index, "carrara": "oops"}))
    assert '"carrara" must name the CLIP run' in one_error_line(export + [bad_index, "--out", tmp_path / "m1"], capsys)
    dangling = tmp_path / "dangling"
    shutil.copytree(run, dangling)
    (dangling / "decoder" / "gone.json").symlink_to(tmp_path / "nowhere.json")
    assert "cannot write" in one_error_line(export + [dangling, "--out", tmp_path / "m2"], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "bad-index", "dangling"]


def distill(teacher, data, out, *flags) -> list:
    return ["distill", "--teacher", teacher, "--data", data, "--out", out, "--steps", "2", "--quiet",
            "--set", "train.batch_size=4", *flags]


@pytest.mark.parametrize("setting, words", [
    ("train.lr=-1", "train.lr must be a finite number ≥ 0, got -1.0"),  # was: torch's ValueError traceback
    ("train.ema_decay=2", "train.ema_decay must be between 0 and 1, got 2.0"),  # was: θ⁻ extrapolated, run "done"
    ("train.checkpoint_every=0", "train.checkpoint_every must be at least 1"),  # was: ZeroDivisionError
    ("train.beta1=1", "train.beta1 and train.beta2 must be in [0, 1), got 1.0 and 0.999"),  # Adam would diverge
    ("embed_dim=4098", "embed_dim=4098 must be an even whole number from 4 to 4096"),  # 10⁸ asked for tens of GB
])
def test_distill_refuses_absurd_settings_before_any_work(tiny_diffusion_run, tiny_shapes, tmp_path, capsys,
                                                         setting, words):
    out = tmp_path / "run"
    assert words in one_error_line(distill(tiny_diffusion_run, tiny_shapes, out, "--set", setting), capsys)
    assert not out.exists()


def test_resume_without_a_run_is_refused_before_reading_data(tiny_diffusion_run, tiny_shapes, tiny_clip_run,
                                                             colours, tmp_path, capsys):
    """Was: the data encoded, then the error, and a run folder with config.json and cache/ left behind."""
    out = tmp_path / "run"
    assert "no complete checkpoint" in one_error_line(distill(tiny_diffusion_run, tiny_shapes, out, "--resume"),
                                                      capsys)
    decoder = ["train", "decoder", "--clip", tiny_clip_run[0], "--data", colours, "--from", tiny_diffusion_run,
               "--out", out, "--quiet", "--resume"]
    assert "drop --resume" in one_error_line(decoder, capsys)
    assert not out.exists()


@pytest.mark.parametrize("setting, words", [
    ("sample_images=-3", "sample_images must be at least 1, got -3"),  # was: torch's RuntimeError after the data
    ("sample_images=0", "sample_images must be at least 1, got 0"),  # was: refused at the first sample grid
    ("sample.stpes=3", "sample.stpes=3: the decoder's sample settings are"),  # was: a TypeError at the first grid
    ("sample.steps=0", "--steps must be between 1 and 1000, got 0"),
    ("image_tokens=0", "num_tokens=0 must be a whole number"),  # refused, but after the data was cached
    ("train.lr=-1", "train.lr must be a finite number ≥ 0"),
])
def test_train_decoder_refuses_bad_settings_before_reading_data(colours, tiny_clip_run, tiny_diffusion_run, tmp_path,
                                                                capsys, setting, words):
    out = tmp_path / "run"
    argv = ["train", "decoder", "--clip", tiny_clip_run[0], "--data", colours, "--from", tiny_diffusion_run,
            "--out", out, "--steps", "2", "--quiet", "--set", setting]
    assert words in one_error_line(argv, capsys)
    assert not out.exists()


def train_decoder_from(source, colours, clip, out) -> list:
    return ["train", "decoder", "--clip", clip, "--data", colours, "--from", source, "--out", out, "--steps", "2",
            "--quiet", "--set", "train.batch_size=4", "--set", "sample_images=1", "--set", "sample.steps=2"]


def test_train_decoder_refuses_a_student_to_start_from(distilled, colours, tiny_clip_run, tmp_path, capsys):
    """Was: the whole run trained, then a TypeError at its first sample grid (the student's U-Net wants its w)."""
    out = tmp_path / "run"
    argv = train_decoder_from(distilled[0], colours, tiny_clip_run[0], out)
    assert "is a distilled student (start from its teacher)" in one_error_line(argv, capsys)
    assert not out.exists()


def test_train_decoder_refuses_an_upsampler_to_start_from(colours, tiny_clip_run, tiny_diffusion_run, tmp_path,
                                                          capsys):
    source, out = tmp_path / "upsampler", tmp_path / "run"
    shutil.copytree(tiny_diffusion_run, source)
    config = json.loads((source / "unet" / "config.json").read_text())
    (source / "unet" / "config.json").write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    argv = train_decoder_from(source, colours, tiny_clip_run[0], out)
    assert "is an upsampler stage" in one_error_line(argv, capsys)
    assert not out.exists()


def test_distill_refuses_an_unclip_teacher(decoder_run, tiny_shapes, tmp_path, capsys):
    """Was: "has no unet/config.json: copy the complete model folder", which it is."""
    out = tmp_path / "run"
    assert "is an unCLIP model" in one_error_line(distill(decoder_run[0], tiny_shapes, out), capsys)
    assert not out.exists()


@pytest.fixture(scope="module")
def index_file(tiny_shapes, tiny_clip_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "shapes.safetensors"
    assert main(["index", str(tiny_shapes), "--clip", str(tiny_clip_run[0]), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("target, words", [(".", "the contact sheet is an image"),
                                           ("sheet.txt", "the contact sheet is an image"),
                                           ("missing/sheet.png", "folder"),
                                           ("a-file/sheet.png", "is not a folder")])
def test_search_refuses_an_unwritable_sheet_before_searching(index_file, tmp_path, capsys, target, words):
    """Was: the search, then a FileNotFoundError / IsADirectoryError traceback (and .txt got PNG bytes)."""
    (tmp_path / "a-file").write_text("x")
    out = one_error_line(["search", "a red circle", "--index", index_file, "-o", tmp_path / target], capsys)
    assert words in out and "search:" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def damaged_index(index_file, folder, *, metadata=None, tensors=None):
    """A copy of the index file with some metadata fields replaced (None: removed) or some tensors replaced."""
    with safe_open(str(index_file), framework="pt") as f:
        meta, stored = f.metadata(), {k: f.get_tensor(k) for k in ("embeddings", "faiss")}
    meta = {k: v for k, v in {**meta, **(metadata or {})}.items() if v is not None}
    out = folder / "damaged.safetensors"
    save_file({**stored, **{k: fn(stored[k]) for k, fn in (tensors or {}).items()}}, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("damage, words", [
    ({"metadata": {"files": "5"}}, "its file list and captions must be lists of text"),  # was: TypeError
    ({"metadata": {"files": "[1, 2]"}}, "its file list and captions must be lists of text"),  # was: TypeError
    ({"metadata": {"texts": '["a"]'}}, "48 files, 1 captions and embeddings of shape (48, 32) disagree"),  # IndexError
    ({"metadata": {"clip": None}}, "its metadata has no 'clip'"),  # was: KeyError
    ({"tensors": {"embeddings": lambda t: t[:5], "faiss": lambda t: t[:0]}},
     "48 files, 48 captions and embeddings of shape (5, 32) disagree"),
    ({"tensors": {"faiss": lambda t: t[:100]}}, "its faiss index is damaged"),  # was: faiss' RuntimeError
])
def test_a_damaged_index_file_is_one_line(index_file, tmp_path, capsys, damage, words):
    """(The fewer-embeddings case searched 5 of 48 images in silence.)"""
    index = damaged_index(index_file, tmp_path, **damage)
    out = one_error_line(["search", "a red circle", "--index", index, "-o", tmp_path / "sheet.png"], capsys)
    assert f"cannot read the index {index}: {words}" in out
    assert not (tmp_path / "sheet.png").exists()


@pytest.mark.parametrize("field", AT_LEAST_ONE)
def test_train_config_counts_must_be_at_least_one(field):
    with pytest.raises(CarraraError, match=f"train.{field} must be at least 1, got 0"):
        TrainConfig(**{field: 0}).check()


@pytest.mark.parametrize("settings, words", [
    ({"batch_size": MAX_BATCH_SIZE + 1}, f"is too large (at most {MAX_BATCH_SIZE})"),
    ({"lr": float("inf")}, "train.lr must be a finite number"), ({"weight_decay": -0.1}, "train.weight_decay"),
    ({"grad_clip": 0.0}, "train.grad_clip > 0"), ({"warmup_steps": -1}, "train.warmup_steps ≥ 0"),
    ({"ema_decay": -0.5}, "between 0 and 1"), ({"ema_decay": float("nan")}, "between 0 and 1"),
])
def test_train_config_refuses_absurd_values(settings, words):
    with pytest.raises(CarraraError) as info:
        TrainConfig(**settings).check()
    assert words in str(info.value)


def test_train_config_accepts_the_edges_runs_use():
    TrainConfig(lr=0.0, ema_decay=0.0, warmup_steps=0, weight_decay=0.0, batch_size=MAX_BATCH_SIZE).check()
    TrainConfig(ema_decay=1.0, grad_clip=float("inf")).check()
