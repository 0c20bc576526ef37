"""`python -m carrara.demo`: the captioned grid for any model folder, and one error line for a bad one."""
from carrara.demo import SHAPES_PROMPTS, main
from carrara.png import read_png_metadata


def test_demo_grid_for_a_given_model(tiny_diffusion_run, tmp_path, capsys):
    out = tmp_path / "docs" / "grid.png"
    assert main(["--model", str(tiny_diffusion_run), "--prompts", "shapes", "--out", str(out)]) == 0
    meta = read_png_metadata(out)
    assert meta["prompts"] == SHAPES_PROMPTS and meta["model"] == str(tiny_diffusion_run)
    assert str(out.resolve()) in capsys.readouterr().out


def test_demo_bad_model_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("carrara demo: error:") and "\n" not in err
    assert not out.exists()
