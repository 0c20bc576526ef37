"""PNG metadata: AUTOMATIC1111's `parameters` infotext written beside carrara's chunk, read back by `--from`, and
an A1111-only PNG (as A1111, Forge or a ComfyUI saver write it) made again by `carrara generate --from`."""
import json

import pytest
from PIL import Image, PngImagePlugin
from test_cli_generate import gen, one_error_line, pixels, write_tiny_model

from carrara.cli import main
from carrara.diffusion.settings import SAMPLER_NAMES
from carrara.errors import CarraraError
from carrara.png import (
    A1111_SAMPLERS,
    PARAMETERS,
    infotext,
    parameter_pairs,
    parse_infotext,
    read_png_metadata,
    save_png,
    settings_from_infotext,
)

SETTINGS = {"prompt": "a red circle", "negative_prompt": "blurry, dark", "steps": 20, "sampler": "dpmpp_karras",
            "guidance": 4.0, "seed": 1234, "size": 64, "model": "/runs/shapes-v2", "model_hash": "0123456789ab",
            "n": 1, "precision": "fp32"}
EXPECTED = ("a red circle\nNegative prompt: blurry, dark\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 4, "
            "Seed: 1234, Size: 64x64, Model hash: 0123456789ab, Model: shapes-v2")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model"))


def a1111_png(path, text: str):
    """A PNG with only an A1111 `parameters` chunk, as A1111 itself saves it."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS, text)
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return path


def test_infotext_is_a1111s_format():
    assert infotext(SETTINGS) == EXPECTED
    assert infotext({**SETTINGS, "negative_prompt": "", "guidance": 7.25, "sampler": "euler_a", "model": "default"}) \
        == ("a red circle\nSteps: 20, Sampler: Euler a, CFG scale: 7.25, Seed: 1234, Size: 64x64, "
            "Model hash: 0123456789ab, Model: default")


def test_every_sampler_has_an_a1111_name():
    assert set(A1111_SAMPLERS) == set(SAMPLER_NAMES)
    assert len(set(A1111_SAMPLERS.values())) == len(SAMPLER_NAMES)


def test_an_edit_records_its_denoising_strength_as_a1111_does():
    text = infotext({**SETTINGS, "strength": 0.55})
    assert text.endswith("Model: shapes-v2, Denoising strength: 0.55")
    assert settings_from_infotext(text, "x.png")["strength"] == 0.55


def test_values_with_commas_or_colons_are_quoted_and_read_back():
    text = infotext({**SETTINGS, "model": "/runs/a, b: c"})
    assert text.endswith('Model: "a, b: c"')
    assert parse_infotext(text)[2]["Model"] == "a, b: c"


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_round_trip_through_a_png(tmp_path, sampler):
    settings = {**SETTINGS, "sampler": sampler, "prompt": "two lines:\na red circle, big", "guidance": 3.7}
    save_png(tmp_path / "a.png", Image.new("RGB", (4, 4)), settings)
    with Image.open(tmp_path / "a.png") as im:
        assert json.loads(im.text["carrara"]) == settings
        text = im.text[PARAMETERS]
    assert settings_from_infotext(text, "a.png") == {
        k: settings[k] for k in ("prompt", "negative_prompt", "steps", "sampler", "guidance", "seed", "size",
                                 "model_hash")}


def test_a_hand_written_a1111_infotext():
    text = ('masterpiece, a cat\nwearing a hat: red\nNegative prompt: ugly,\nbad hands\n'
            'Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 965400086, Size: 512x512, '
            'Model hash: 45dee52b, Model: "v1-5, pruned", Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.9.4')
    prompt, negative, params = parse_infotext(text)
    assert prompt == "masterpiece, a cat\nwearing a hat: red" and negative == "ugly,\nbad hands"
    assert params["Model"] == "v1-5, pruned" and params["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert params["Version"] == "v1.9.4"
    assert settings_from_infotext(text, "x.png") == {
        "prompt": "masterpiece, a cat\nwearing a hat: red", "negative_prompt": "ugly,\nbad hands", "steps": 28,
        "sampler": "dpmpp_karras", "guidance": 6.5, "seed": 965400086, "size": 512, "model_hash": "45dee52b"}


def test_a_prompt_only_infotext_is_all_prompt():
    """Fewer than 3 "Key: value" pairs on the last line: A1111 reads it as part of the prompt."""
    assert parse_infotext("a cat\nstyle: oil, colour: red") == ("a cat\nstyle: oil, colour: red", "", {})


def test_escaped_quotes_in_a_quoted_value():
    assert parameter_pairs(r'Steps: 2, Model: "a \"b\", c", Seed: 3') == [("Steps", "2"), ("Model", 'a "b", c'),
                                                                         ("Seed", "3")]


def test_a_long_line_without_colons_reads_in_linear_time():
    """A1111's regular expression backtracks quadratically here (minutes at 1 MB); the scanner reads it at once."""
    assert parse_infotext("a " * 500_000 + "\nb") == ("a " * 499_999 + "a\nb", "", {})


@pytest.mark.parametrize("text, words", [
    ("a cat\nSteps: many, Sampler: Euler, Seed: 1", "gives Steps 'many', not a whole number"),
    ("a cat\nSteps: 20, CFG scale: high, Seed: 1", "gives CFG scale 'high', not a number"),
    ("a cat\nSteps: 20, Seed: 1.5e9, Size: 64x64", "gives Seed '1.5e9', not a whole number"),
    ("a cat\nSteps: 20, Seed: 1, Size: 512x768", "carrara makes square images"),
    ("a cat\nSteps: 20, Seed: 1, Size: \x00\xff", "Size '\\x00ÿ'"),
])
def test_hostile_infotext_is_one_error(tmp_path, text, words):
    png = a1111_png(tmp_path / "h.png", text)
    with pytest.raises(CarraraError) as e:
        read_png_metadata(png)
    assert words in str(e.value) and "\n" not in str(e.value) and str(png) in str(e.value)


@pytest.mark.parametrize("text, words", [
    ("a cat\nSteps: 20, Sampler: DPM++ SDE, Seed: 1", "sampler 'DPM++ SDE' is not one carrara has (DDPM, DDIM"),
    ("a cat\nSteps: 99999, Sampler: Euler, Seed: 1", "--steps must be between 1 and 1000"),
    ("a cat\nSteps: 20, CFG scale: nan, Seed: 1", "--guidance must be between 0 and 50, got nan"),
    ("\nSteps: 20, Sampler: Euler, Seed: 1", "give a prompt"),
])
def test_generate_from_a_hostile_a1111_png_is_one_line(model, tmp_path, capsys, text, words):
    png = a1111_png(tmp_path / "h.png", text)
    assert main(["generate", "--model", str(model), "--from", str(png), "--quiet", "-o", str(tmp_path / "out.png")]) == 2
    assert words in one_error_line(capsys)
    assert not (tmp_path / "out.png").exists()


def test_no_metadata_at_all_is_one_line(tmp_path, capsys):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert main(["generate", "--from", str(tmp_path / "plain.png"), "-o", str(tmp_path / "out.png")]) == 2
    assert "neither carrara's chunk nor an AUTOMATIC1111 'parameters' chunk" in one_error_line(capsys)


def test_generate_from_an_a1111_only_png_equals_the_same_flags(model, tmp_path, capsys):
    """An A1111 PNG's prompt, negative prompt, steps, sampler, CFG, seed and size give the image those flags give;
    its model hash is not this model's, which is a warning, not an error."""
    png = a1111_png(tmp_path / "a1111.png", "a red circle\nNegative prompt: a blue square\nSteps: 3, Sampler: Euler a, "
                    "CFG scale: 2.5, Seed: 77, Size: 16x16, Model hash: 45dee52b, Model: v1-5-pruned-emaonly")
    assert main(["generate", "--model", str(model), "--precision", "fp32", "--from", str(png), "--quiet",
                 "-o", str(tmp_path / "from.png")]) == 0
    assert "was made by model 45dee52b" in capsys.readouterr().err
    assert gen(model, "a red circle", "--negative", "a blue square", "--steps", "3", "--sampler", "euler_a",
               "--guidance", "2.5", "--seed", "77", "--size", "16", "--quiet", "-o", str(tmp_path / "flags.png")) == 0
    assert (pixels(tmp_path / "from.png") == pixels(tmp_path / "flags.png")).all()
    again = read_png_metadata(tmp_path / "from.png")
    assert {k: again[k] for k in ("prompt", "negative_prompt", "steps", "sampler", "guidance", "seed", "size")} == {
        "prompt": "a red circle", "negative_prompt": "a blue square", "steps": 3, "sampler": "euler_a",
        "guidance": 2.5, "seed": 77, "size": 16}


def test_an_unknown_a1111_sampler_is_overridden_by_the_flag(model, tmp_path):
    png = a1111_png(tmp_path / "sde.png", "a red circle\nSteps: 2, Sampler: DPM++ SDE Karras, CFG scale: 4, Seed: 5")
    assert gen(model, "--from", str(png), "--sampler", "ddim", "--quiet", "-o", str(tmp_path / "out.png")) == 0
    assert read_png_metadata(tmp_path / "out.png")["sampler"] == "ddim"


def test_generated_pngs_carry_both_chunks(model, tmp_path):
    assert gen(model, "a red circle", "--seed", "4", "--sampler", "euler", "--quiet", "-o", str(tmp_path / "a.png")) == 0
    with Image.open(tmp_path / "a.png") as im:
        meta, text = json.loads(im.text["carrara"]), im.text[PARAMETERS]
    assert text == (f"a red circle\nSteps: 2, Sampler: Euler, CFG scale: 4, Seed: 4, Size: 16x16, "
                    f"Model hash: {meta['model_hash']}, Model: {meta['model'].rsplit('/', 1)[-1]}")
