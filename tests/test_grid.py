"""Image grids: geometry, placement, captions."""
import numpy as np
from PIL import Image

from carrara.images import image_grid


def _tiles(n, size=8):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_grid_places_each_image_row_by_row():
    tiles = _tiles(5)
    grid = np.asarray(image_grid(tiles, rows=2, pad=1))  # 2 rows × 3 columns
    assert grid.shape == (2 * 8 + 3, 3 * 8 + 4, 3)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, 3)
        y, x = 1 + r * 9, 1 + c * 9
        np.testing.assert_array_equal(grid[y:y + 8, x:x + 8], np.asarray(tile))
    assert (grid[10:18, 19:27] == 255).all()  # the sixth cell is empty background


def test_labels_go_under_scaled_images():
    tiles = _tiles(2, size=32)
    plain = image_grid(tiles, rows=1, pad=2, scale=2)
    labelled = np.asarray(image_grid(tiles, rows=1, pad=2, scale=2, labels=["a red sports car", "pizza"]))
    assert plain.size == (2 * 64 + 6, 64 + 4)
    assert labelled.shape[1] == plain.size[0] and labelled.shape[0] > plain.size[1]  # room for the captions
    np.testing.assert_array_equal(labelled[2:66, 2:66], np.asarray(tiles[0].resize((64, 64), Image.NEAREST)))
    caption = labelled[66:, 2:66]
    assert (caption < 128).any() and (caption == 255).mean() > 0.5  # dark text on white
