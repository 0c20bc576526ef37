"""`carrara generate` as a user meets it: progress on stderr, numbered outputs, one PNG per image, `--from`
with its own --n, hostile --from PNGs and unwritable -o targets as one line, and `carrara --version`."""
import importlib.metadata
import json

import numpy as np
import pytest
import torch
from conftest import TINY_UNET, TINY_VAE
from PIL import Image, PngImagePlugin

from carrara.cli import main
from carrara.diffusion.schedule import NoiseSchedule
from carrara.modelfolder import write_model_folder
from carrara.models.autoencoder import AutoencoderKL
from carrara.models.config import AutoencoderConfig, UNetConfig
from carrara.models.unet import UNet2DConditionModel
from carrara.png import read_png_metadata


def write_tiny_model(root):
    """A random tiny model folder (conftest's TINY_UNET/TINY_VAE shapes, MiniLM text, 16×16 images)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig(**TINY_UNET, sample_size=8, cross_attention_dim=384))
    with torch.no_grad():  # diffusers zero-initialises conv_out; random weights make outputs depend on the text
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    schedule = NoiseSchedule.from_config("scaled_linear", T=1000)
    write_model_folder(root, unet=unet, vae=AutoencoderKL(AutoencoderConfig(**TINY_VAE)),
                       scheduler_config=schedule.to_diffusers_config(), text_encoder="minilm")
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model"))


def gen(model, *argv):
    return main(["generate", "--model", str(model), "--steps", "2", "--precision", "fp32", *argv])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("carrara: error: ") and "Traceback" not in err[0], err
    return err[0]


def test_progress_bar_on_stderr_and_quiet_silences_it(model, tmp_path, capsys):
    assert gen(model, "a red circle", "--steps", "3", "-o", str(tmp_path / "a.png")) == 0
    out, err = capsys.readouterr()
    assert "denoising" in err and "3/3" in err  # tqdm's bar, finished, on stderr
    assert "denoising" not in out and "wrote" in out
    assert gen(model, "a red circle", "--steps", "3", "--quiet", "-o", str(tmp_path / "b.png")) == 0
    out, err = capsys.readouterr()
    assert err == "" and "wrote" in out


def test_existing_output_is_numbered_not_overwritten(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert gen(model, "a red circle", "--seed", "1", "--quiet") == 0  # the default name, carrara.png
    first = pixels(tmp_path / "carrara.png")
    assert gen(model, "a blue square", "--seed", "2", "--quiet") == 0
    assert gen(model, "a green star", "--seed", "3", "--quiet") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["carrara-00001.png", "carrara-00002.png", "carrara.png"]
    assert np.array_equal(pixels(tmp_path / "carrara.png"), first)  # untouched
    assert read_png_metadata(tmp_path / "carrara-00002.png")["prompt"] == "a green star"
    assert "carrara-00002.png" in capsys.readouterr().out
    (tmp_path / "carrara-00001.png").unlink()  # the next number follows the highest in use, not the first gap
    assert gen(model, "a pink cross", "--quiet") == 0
    assert (tmp_path / "carrara-00003.png").is_file() and not (tmp_path / "carrara-00001.png").exists()


def test_overwrite_replaces_the_file(model, tmp_path):
    out = tmp_path / "x.png"
    assert gen(model, "a red circle", "--seed", "1", "--quiet", "-o", str(out)) == 0
    assert gen(model, "a blue square", "--seed", "2", "--quiet", "--overwrite", "-o", str(out)) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    assert read_png_metadata(out)["prompt"] == "a blue square"


def test_n_images_are_saved_one_by_one_besides_the_grid(model, tmp_path):
    out = tmp_path / "cars.png"
    assert gen(model, "a red car", "--seed", "7", "--n", "3", "--quiet", "-o", str(out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cars-0.png", "cars-1.png", "cars-2.png", "cars.png"]
    grid = read_png_metadata(out)
    assert grid["n"] == 3 and grid["seed"] == 7
    for i in range(3):
        meta = read_png_metadata(tmp_path / f"cars-{i}.png")
        assert meta["seed"] == 7 + i and meta["n"] == 1 and meta["prompt"] == "a red car"
        assert Image.open(tmp_path / f"cars-{i}.png").size == (16, 16)
    # image 2 alone, made again from its own PNG, has its pixels
    assert main(["generate", "--from", str(tmp_path / "cars-2.png"), "--quiet", "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "cars-2.png"))
    # a second run with a taken name numbers the whole set
    assert gen(model, "a red car", "--n", "2", "--quiet", "-o", str(out)) == 0
    assert {"cars-00001.png", "cars-00001-0.png", "cars-00001-1.png"} <= {p.name for p in tmp_path.iterdir()}


def test_from_with_n_1_makes_one_image(model, tmp_path):
    assert gen(model, "a red car", "--n", "4", "--quiet", "-o", str(tmp_path / "four.png")) == 0
    assert main(["generate", "--from", str(tmp_path / "four.png"), "--n", "1", "--quiet",
                 "-o", str(tmp_path / "one.png")]) == 0
    assert read_png_metadata(tmp_path / "one.png")["n"] == 1
    assert Image.open(tmp_path / "one.png").size == (16, 16)  # not a grid
    assert not (tmp_path / "one-0.png").exists()
    # without --n the PNG's n is kept
    assert main(["generate", "--from", str(tmp_path / "four.png"), "--quiet", "-o", str(tmp_path / "g.png")]) == 0
    assert read_png_metadata(tmp_path / "g.png")["n"] == 4


@pytest.mark.parametrize("target, words", [("/sys/x.png", "cannot write in folder /sys"),
                                           ("missing/x.png", "does not exist"),
                                           ("file.txt/x.png", "is not a folder"),
                                           ("adir.png", "is a folder")])
def test_unwritable_output_fails_before_generating(model, tmp_path, monkeypatch, capsys, target, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "adir.png").mkdir()
    loaded = []
    monkeypatch.setattr("carrara.pipeline.Pipeline.load", lambda *a, **k: loaded.append(a))
    assert gen(model, "a red circle", "-o", target) == 2
    assert words in one_error_line(capsys)
    assert loaded == []  # refused before any model was loaded or image computed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.png", "file.txt"]


def test_failed_write_leaves_no_file_and_one_line(model, tmp_path, monkeypatch, capsys):
    """A write that fails after generating (disk full) is one line, and no half of the set is left."""
    calls, real_save = [], Image.Image.save

    def save_until_the_disk_is_full(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_until_the_disk_is_full)
    assert gen(model, "a red circle", "--n", "3", "--quiet", "-o", str(tmp_path / "x.png")) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []  # two written, none renamed, temporaries gone


def write_png_with_metadata(path, text):
    info = PngImagePlugin.PngInfo()
    info.add_text("carrara", text)
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("text, words", [
    ("[1, 2]", "not a JSON object"),
    ("not json", "not valid JSON"),
    ('{"prompt": "a cat", "steps": "20"}', "'steps' must be a whole number"),
    ('{"prompt": 5}', "'prompt' must be text"),
    ('{"prompt": "a cat", "seed": 1.5}', "'seed' must be a whole number"),
    ('{"prompt": "a cat", "guidance": "high"}', "'guidance' must be a number"),
    ('{"prompt": "a cat", "n": true}', "'n' must be a whole number"),
    ('{"prompt": "a cat", "model": [1]}', "'model' must be a model path"),
    ('{"prompt": "a cat", "negative_prompt": {}}', "'negative_prompt' must be text"),
    ('{"prompt": "a cat", "sampler": 3}', "'sampler' must be a sampler name"),
    ('{"prompt": "a cat", "precision": null}', "'precision' must be a precision name"),
    ('{"prompt": "a cat", "n": 100000}', "--n must be between 1 and 64"),
])
def test_from_png_with_wrong_metadata_is_one_line(tmp_path, capsys, text, words):
    png = write_png_with_metadata(tmp_path / "bad.png", text)
    assert main(["generate", "--from", str(png), "-o", str(tmp_path / "out.png")]) == 2
    assert words in one_error_line(capsys)
    assert not (tmp_path / "out.png").exists()


def test_version_is_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"carrara {importlib.metadata.version('carrara')}"


def test_help_documents_the_output_names(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "out-0.png" in text and "out-00001.png" in text and "--overwrite" in text


def test_metadata_records_the_settings(model, tmp_path):
    assert gen(model, "a red circle", "--seed", "4", "--quiet", "-o", str(tmp_path / "a.png")) == 0
    meta = read_png_metadata(tmp_path / "a.png")
    assert {k: meta[k] for k in ("prompt", "seed", "steps", "n", "precision")} == {
        "prompt": "a red circle", "seed": 4, "steps": 2, "n": 1, "precision": "fp32"}
    assert json.loads(Image.open(tmp_path / "a.png").text["carrara"]) == meta


def test_from_a_png_bomb_says_too_large(tmp_path, capsys):
    """A PNG whose header claims 20000 × 20000 pixels is refused before its pixels are read."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # 8-bit RGB
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    assert main(["generate", "--from", str(bomb), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "too large" in err and err.count("\n") == 1
