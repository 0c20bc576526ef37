"""`carrara generate --init / --mask / --strength` as a user meets it: the edit is recorded in the PNG and --from
makes it again; inpainting keeps the unmasked pixels; bad pictures and flags are one line."""
import numpy as np
import pytest
from PIL import Image
from test_cli_generate import gen, one_error_line, pixels, write_tiny_model

from carrara.png import read_png_metadata


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    init = Image.new("RGBA", (40, 32), (0, 0, 0, 0))  # not square, transparent border: cropped, put on white
    init.paste((30, 90, 200, 255), (8, 4, 32, 28))
    init.save(folder / "init.png")
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (8, 0, 16, 16))  # regenerate the right half
    mask.save(folder / "mask.png")
    (folder / "broken.png").write_bytes(Image.new("RGB", (16, 16)).tobytes()[:40] + b"\x89PNG")
    return folder


def test_img2img_records_the_picture_and_from_makes_it_again(model, pictures, tmp_path, capsys):
    out = tmp_path / "edit.png"
    assert gen(model, "a blue square", "--init", str(pictures / "init.png"), "--strength", "0.5", "--steps", "4",
               "-o", str(out)) == 0
    meta = read_png_metadata(out)
    assert meta["strength"] == 0.5 and meta["init"]["file"] == str((pictures / "init.png").resolve())
    assert len(meta["init"]["sha256"]) == 16 and "mask" not in meta
    again = tmp_path / "again.png"
    assert main_from(out, again) == 0
    assert np.array_equal(pixels(again), pixels(out))
    txt = tmp_path / "txt.png"
    assert gen(model, "a blue square", "--steps", "4", "-o", str(txt)) == 0
    assert not np.array_equal(pixels(txt), pixels(out))  # the picture changed the result


def main_from(png, out):
    from carrara.cli import main

    return main(["generate", "--from", str(png), "-o", str(out), "--quiet"])


def test_inpainting_keeps_the_unmasked_pixels_of_the_picture(model, pictures, tmp_path):
    out = tmp_path / "inpaint.png"
    assert gen(model, "a red circle", "--init", str(pictures / "init.png"), "--mask", str(pictures / "mask.png"),
               "-o", str(out)) == 0
    meta = read_png_metadata(out)
    assert meta["strength"] == 1.0 and meta["mask"]["file"].endswith("mask.png")
    from carrara.images import square

    expected = np.asarray(square(Image.open(pictures / "init.png"), 16))
    got = pixels(out)
    assert np.array_equal(got[:, :8], expected[:, :8])  # kept: the picture's own pixels
    assert not np.array_equal(got[:, 8:], expected[:, 8:])  # regenerated


@pytest.mark.parametrize("argv, words", [
    (["--init", "{p}/missing.png"], "no such file"),
    (["--init", "{p}/broken.png"], "not an image"),
    (["--init", "{p}"], "is a folder"),
    (["--init", "{p}/init.png", "--strength", "0"], "(0, 1]"),
    (["--init", "{p}/init.png", "--strength", "1.5"], "(0, 1]"),
    (["--strength", "0.5"], "give it with --init"),
    (["--mask", "{p}/mask.png"], "give it with --init"),
    (["--init", "{p}/init.png", "--mask", "{p}/missing.png"], "no such file"),
])
def test_bad_edit_inputs_are_one_line_and_write_nothing(model, pictures, tmp_path, capsys, argv, words):
    out = tmp_path / "x.png"
    code = gen(model, "a cat", *[a.format(p=pictures) for a in argv], "-o", str(out))
    assert code != 0 and words in one_error_line(capsys)
    assert not out.exists()


def test_from_a_png_whose_init_is_gone_says_so(model, pictures, tmp_path, capsys):
    init = tmp_path / "moved.png"
    init.write_bytes((pictures / "init.png").read_bytes())
    out = tmp_path / "edit.png"
    assert gen(model, "a cat", "--init", str(init), "--steps", "2", "-o", str(out)) == 0
    init.unlink()
    capsys.readouterr()
    assert main_from(out, tmp_path / "again.png") != 0
    assert "is gone" in one_error_line(capsys)
