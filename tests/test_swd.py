"""SWD over Laplacian-pyramid patches (carrara/evaluate/swd.py), against scipy and by its defining properties."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from carrara.errors import CarraraError
from carrara.evaluate.swd import (
    KERNEL,
    descriptors,
    directions,
    laplacian_pyramid,
    pyr_down,
    pyr_up,
    reconstruct,
    sliced_wasserstein,
    swd,
)

scipy_ndimage = pytest.importorskip("scipy.ndimage")


def test_pyramid_filters_equal_scipy_convolve_with_mirrored_edges():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255
    k = KERNEL.numpy()[None, None]
    ref_down = scipy_ndimage.convolve(x.numpy(), k, mode="mirror")[:, :, ::2, ::2]
    np.testing.assert_allclose(pyr_down(x).numpy(), ref_down, atol=1e-3)
    small = pyr_down(x)
    zeros = np.zeros((2, 3, 16, 16), np.float32)
    zeros[:, :, ::2, ::2] = small.numpy()
    np.testing.assert_allclose(pyr_up(small).numpy(), scipy_ndimage.convolve(zeros, 4 * k, mode="mirror"), atol=1e-3)


def test_the_pyramid_reconstructs_its_image():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    pyramid = laplacian_pyramid(x, 3)
    assert [p.shape[-1] for p in pyramid] == [64, 32, 16]
    torch.testing.assert_close(reconstruct(pyramid), x, atol=1e-3, rtol=0)


def test_sliced_wasserstein_is_scipys_wasserstein_distance_averaged_over_directions():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(0.5, 2.0, size=(200, 6))
    dirs = directions(6, 5, seed=3)
    expected = np.mean([stats.wasserstein_distance(a @ d, b @ d) for d in dirs.T])
    assert sliced_wasserstein(a, b, dirs) == pytest.approx(expected, rel=1e-9)
    assert sliced_wasserstein(a, b, dirs, chunk=2) == pytest.approx(expected, rel=1e-9)  # 2 + 2 + 1 directions
    assert np.allclose(np.linalg.norm(dirs, axis=0), 1)


def shapes_like(n: int, seed: int) -> torch.Tensor:
    """uint8 (n, 3, 64, 64): a few flat-coloured rectangles with hard edges on a white ground."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((n, 3, 64, 64), 255, dtype=torch.uint8)
    for im in out:
        for _ in range(4):
            y, x = torch.randint(0, 48, (2,), generator=g).tolist()
            h, w = torch.randint(6, 16, (2,), generator=g).tolist()
            im[:, y:y + h, x:x + w] = torch.randint(0, 256, (3, 1, 1), generator=g, dtype=torch.uint8)
    return out


def test_swd_is_zero_for_one_set_and_sees_blur_at_the_finest_level_only():
    real, other = shapes_like(64, 0), shapes_like(64, 1)
    blurred = F.interpolate(F.avg_pool2d(real.float(), 2), scale_factor=2, mode="bicubic").clamp(0, 255).round()
    R, O, B = (descriptors(x, seed=0) for x in (real, other, blurred.to(torch.uint8)))
    assert sorted(R) == [16, 32, 64] and R[64].shape == (64, 128, 147)
    assert all(swd(R[r], R[r]) == 0 for r in R)
    assert np.array_equal(descriptors(real, seed=0)[64], R[64])  # the neighbourhoods are seeded
    # the blurred originals are further from them than an independent sample (58 vs 26) at 64 px, and closer at
    # 16 px (7 vs 37), where the blur left them as they were
    assert swd(B[64], R[64]) > 2 * swd(O[64], R[64])
    assert swd(B[16], R[16]) < 0.5 * swd(O[16], R[16])


def test_swd_refuses_what_it_cannot_measure():
    with pytest.raises(CarraraError, match="power-of-two"):
        descriptors(torch.zeros(2, 3, 48, 48, dtype=torch.uint8))
    with pytest.raises(CarraraError, match="square RGB"):
        descriptors(torch.zeros(2, 1, 64, 64, dtype=torch.uint8))
    with pytest.raises(CarraraError, match="equal size"):
        sliced_wasserstein(np.zeros((3, 2)), np.zeros((4, 2)), directions(2, 1, 0))
