"""`python -m carrara.demo`: the captioned grid for any model folder, and one error line for a bad one."""
import numpy as np
from PIL import Image

from carrara.demo import SHAPES_PROMPTS, main
from carrara.pipeline import Pipeline
from carrara.png import read_png_metadata


def test_demo_grid_for_a_given_model(tiny_diffusion_run, tmp_path, capsys):
    out = tmp_path / "docs" / "grid.png"
    assert main(["--model", str(tiny_diffusion_run), "--prompts", "shapes", "--out", str(out)]) == 0
    meta = read_png_metadata(out)
    assert meta["prompts"] == SHAPES_PROMPTS and meta["model"] == str(tiny_diffusion_run)
    assert str(out.resolve()) in capsys.readouterr().out
    # tile i (row by row, 2× enlarged, caption below) is prompt i generated alone with seed i, as the PNG says
    grid = np.asarray(Image.open(out).convert("RGB"))
    pipe, pad = Pipeline.load(tiny_diffusion_run), 2
    for i in (0, 6, 15):
        image = pipe([SHAPES_PROMPTS[i]], steps=20, sampler="dpmpp", guidance=4.0, seed=i)[0]
        size = 2 * image.width  # 32
        cell_h = (grid.shape[0] - 5 * pad) // 4  # 4 rows: image + caption
        assert grid.shape[1] == 4 * size + 5 * pad and cell_h > size
        want = np.asarray(image.resize((size, size), Image.NEAREST)).astype(int)
        r, c = divmod(i, 4)
        y, x = pad + r * (cell_h + pad), pad + c * (size + pad)
        assert np.abs(grid[y:y + size, x:x + size] - want).max() <= 1  # batch-of-16 vs alone: rounding only
        assert (grid[y + size:y + cell_h, x:x + size] < 128).any()  # its caption, dark on white


def test_demo_bad_model_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("carrara demo: error:") and "\n" not in err
    assert not out.exists()
