"""FID, KID and the FID Inception against pytorch-fid, torchmetrics and clean-fid.

pytorch-fid and clean-fid require torchvision, whose PyPI build for torch 2.13 (0.28.0) links CUDA torch and fails
to load with the CPU build, so they are not test dependencies: the expected numbers below were computed with
pytorch-fid 0.3.0 (on torchvision 0.28's Inception3 source) and clean-fid 0.1.35, and where one of them is installed
the tests also compare against it live (its FID function and resizer need no torchvision).
"""
import ast
import hashlib
import importlib.util
import itertools
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from carrara.errors import CarraraError
from carrara.evaluate import fid
from carrara.evaluate.fid import feature_stats, frechet_distance, kid
from carrara.evaluate.inception import FIDInceptionV3, InceptionFeatures, load_inception, resize_clean

REL = 1e-6
SQRTM = scipy.linalg.sqrtm


def _gaussians(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) standard normal features and (n, d) correlated, shifted ones."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d))
    b = rng.standard_normal((n, d)) @ (np.eye(d) + 0.3 * rng.standard_normal((d, d))) + 0.5
    return a, b


def _source(module: str) -> Path | None:
    """Path of an installed module's source without importing it (pytorch-fid's modules import torchvision)."""
    try:
        spec = importlib.util.find_spec(module)
    except ImportError:
        return None
    return Path(spec.origin) if spec and spec.origin else None


def _reference_source(module: str, package: str) -> Path:
    """The installed reference's source, or a reported skip: the live cross-checks need packages CI may not have."""
    path = _source(module)
    if path is None:
        pytest.skip(f"{package} is not installed: no live cross-check against it (the fixed values still run)")
    return path


def _pytorch_fid_frechet(sqrtm: Callable = SQRTM) -> Callable:
    """pytorch-fid's `calculate_frechet_distance` from its installed source (with `linalg.sqrtm = sqrtm`)."""
    path = _reference_source("pytorch_fid.fid_score", "pytorch-fid")
    tree = ast.parse(path.read_text())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_frechet_distance")
    linalg = type("linalg", (), {"sqrtm": staticmethod(lambda m, disp=True: sqrtm(m) if disp else (sqrtm(m), 0.0))})
    namespace = {"np": np, "linalg": linalg, "print": lambda *a: None}
    exec(compile(ast.Module([func], []), str(path), "exec"), namespace)  # noqa: S102 (the reference's own source)
    return namespace["calculate_frechet_distance"]


def _nan_once() -> Callable:
    """A sqrtm that returns NaN on its first call, as sqrtm may for a singular Σ1Σ2 (pytorch-fid's eps case)."""
    calls = []

    def sqrtm(m: np.ndarray) -> np.ndarray:
        calls.append(m)
        return np.full(m.shape, np.nan) if len(calls) == 1 else SQRTM(m)
    return sqrtm


FID_CASES = [(200, 64, 263.3009676023746), (20, 64, 372.1041728139775)]  # pytorch-fid 0.3.0, SciPy 1.17.1


@pytest.mark.parametrize("n, d, expected", FID_CASES)
def test_frechet_distance_matches_pytorch_fid(n, d, expected):
    a, b = _gaussians(n, d)  # n=20 < d=64: rank-deficient covariances
    stats = [*feature_stats(a), *feature_stats(b)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SciPy's "matrix is singular"
        assert frechet_distance(*stats) == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("n, d", [case[:2] for case in FID_CASES])
def test_frechet_distance_equals_live_pytorch_fid(n, d):
    reference = _pytorch_fid_frechet()
    stats = [*feature_stats(_gaussians(n, d)[0]), *feature_stats(_gaussians(n, d)[1])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SciPy's "matrix is singular"
        assert frechet_distance(*stats) == pytest.approx(reference(*stats), rel=REL)


def test_frechet_distance_eps_fix(monkeypatch):
    a, b = _gaussians(20, 64)
    monkeypatch.setattr(fid, "linalg", SimpleNamespace(sqrtm=_nan_once()))
    with pytest.warns(UserWarning, match="adding 1e-06 to the diagonal"):
        got = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert got == pytest.approx(372.10347663969355, rel=REL)  # pytorch-fid with the same NaN-once sqrtm


def test_frechet_distance_eps_fix_equals_live_pytorch_fid(monkeypatch):
    reference = _pytorch_fid_frechet(_nan_once())
    a, b = _gaussians(20, 64)
    monkeypatch.setattr(fid, "linalg", SimpleNamespace(sqrtm=_nan_once()))
    with pytest.warns(UserWarning, match="adding 1e-06 to the diagonal"):
        got = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert got == pytest.approx(reference(*feature_stats(a), *feature_stats(b)), rel=REL)


def test_frechet_distance_closed_forms():
    mu, sigma = feature_stats(_gaussians(200, 64)[1])
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # diagonal Gaussians: ||Δμ||² + Σ_i (√a_i − √b_i)² = 9 + (1 + 1 + 1)
    got = frechet_distance(np.zeros(3), np.diag([1.0, 4.0, 9.0]), np.array([1.0, 2.0, 2.0]), np.diag([4.0, 1.0, 16.0]))
    assert got == pytest.approx(12.0, rel=1e-9)


def test_frechet_distance_grows_monotonically_with_added_noise():
    real = _gaussians(500, 32)[0]
    noise = np.random.default_rng(7).standard_normal(real.shape)
    mu, sigma = feature_stats(real)
    fds = [frechet_distance(mu, sigma, *feature_stats(real + s * noise)) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert fds[0] < 1e-6 and all(a < b for a, b in itertools.pairwise(fds)), fds


def test_frechet_distance_errors():
    with pytest.raises(CarraraError, match="disagree in shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(CarraraError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2), np.array([np.nan, 0.0]), np.eye(2))
    with pytest.raises(CarraraError, match="at least 2 samples"):
        feature_stats(np.zeros((1, 8)))


def test_kid_matches_torchmetrics():
    from torchmetrics.image.kid import poly_mmd

    x, y = _gaussians(60, 16)
    y = y / 3
    t = torch.from_numpy  # float64 tensors
    mean, std = kid(x, y, subsets=1, subset_size=60)  # the whole sets: MMD² does not depend on their order
    assert mean == pytest.approx(poly_mmd(t(x), t(y)).item(), rel=REL) and std == 0.0

    rng = np.random.default_rng(3)  # kid's documented subset draws: real then generated, per subset
    draws = [(rng.choice(60, 20, replace=False), rng.choice(60, 20, replace=False)) for _ in range(5)]
    scores = torch.stack([poly_mmd(t(x[i]), t(y[j]), degree=3, gamma=None, coef=1.0) for i, j in draws])
    mean, std = kid(x, y, subsets=5, subset_size=20, seed=3)
    assert mean == pytest.approx(scores.mean().item(), rel=REL)
    assert std == pytest.approx(scores.std(unbiased=False).item(), rel=REL)  # torchmetrics' compute()


def test_kid_clips_subset_size_and_errors():
    x, y = _gaussians(30, 8)
    with pytest.warns(UserWarning, match="using subset_size 25"):
        clipped = kid(x, y[:25], subsets=3, subset_size=1000)
    assert clipped == kid(x, y[:25], subsets=3, subset_size=25)
    with pytest.raises(CarraraError, match="at least 2 samples"):
        kid(x[:1], y)
    with pytest.raises(CarraraError, match="differ in dimension"):
        kid(x, y[:, :4])
    y[3, 2] = np.nan
    with pytest.raises(CarraraError, match="NaN"):
        kid(x, y)


def _random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights: He-normal convs/fc, BatchNorm near identity (keys drawn in sorted order)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sorted(model.state_dict().items()):
        if k.endswith("num_batches_tracked"):
            out[k] = torch.zeros((), dtype=torch.long)
        elif k.endswith("weight") and v.ndim > 1:
            out[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith("running_var"):
            out[k] = 1 + 0.1 * torch.rand(v.shape, generator=g)
        elif k.endswith("bn.weight"):
            out[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:  # bn.bias, bn.running_mean, fc.bias
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
    return out


def _images() -> np.ndarray:
    """(2, 3, 299, 299) uint8: noise and a colour ramp."""
    noise = np.random.default_rng(0).integers(0, 256, (3, 299, 299), dtype=np.uint8)
    yy, xx = np.mgrid[0:299, 0:299]
    ramp = np.stack([xx * 255 // 298, yy * 255 // 298, (xx + yy) * 255 // 596]).astype(np.uint8)
    return np.stack([noise, ramp])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(_random_state_dict(FIDInceptionV3()), path)
    return path


def test_inception_state_dict_names_are_pytorch_fids():
    state = FIDInceptionV3().state_dict()
    signature = "\n".join(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in sorted(state.items()))
    # sha256 of pytorch-fid's fid_inception_v3() keys and shapes (torchvision 0.28 Inception3, 1008 classes)
    assert hashlib.sha256(signature.encode()).hexdigest() == \
        "b1e5ec46df6cb0a4b6370fe9cea0e3124bc4a6e2df0929c1bc5d845c55f01ac8"
    assert len(state) == 566


def test_inception_has_the_blocks_live_pytorch_fid_takes():
    path = _reference_source("pytorch_fid", "pytorch-fid")
    state = FIDInceptionV3().state_dict()
    # the blocks pytorch-fid's InceptionV3 takes from the network, by name
    blocks = set(re.findall(r"inception\.(\w+_\dx\d|Mixed_\d\w)\b", (path.parent / "inception.py").read_text()))
    assert len(blocks) == 16 and blocks <= {k.split(".")[0] for k in state}


def test_inception_features_match_pytorch_fid(weights):
    feats = InceptionFeatures(weights, allow_pickle=True).extract(_images(), batch_size=1, progress=False).astype(np.float64)  # (2, 2048)
    # pytorch-fid's InceptionV3([3], resize_input=False, normalize_input=True) on images / 255, same weights
    expected = [[1.4832969903945923, 0.0, 0.10039550065994263, 0.2637800872325897, 0.08200757205486298,
                 0.1259251832962036],
                [0.7423530220985413, 0.0, 0.02123452164232731, 0.020474951714277267, 0.006741413846611977,
                 0.039405349642038345]]
    np.testing.assert_allclose(feats[:, :6], expected, rtol=1e-4, atol=1e-6)
    assert feats.sum(1) == pytest.approx([749.9335438878479, 426.38450046590333], rel=1e-4)
    assert np.linalg.norm(feats, axis=1) == pytest.approx([27.49397848848854, 15.702714197085873], rel=1e-4)
    w = np.random.default_rng(1).standard_normal(2048)
    assert feats @ w == pytest.approx([-42.622327947653254, -29.006102368778343], rel=1e-4)


def test_inception_accepts_pil_and_safetensors(weights, tmp_path):
    from safetensors.torch import save_file

    state = {k: v for k, v in torch.load(weights, weights_only=True).items() if "num_batches_tracked" not in k}
    save_file(state, tmp_path / "inception.safetensors")  # without num_batches_tracked, as old torch saved
    features = InceptionFeatures(tmp_path / "inception.safetensors")
    images = _images()[:, :, :64, :80]  # (2, 3, 64, 80): resized to 299×299 inside
    pil = [Image.fromarray(im.transpose(1, 2, 0)) for im in images]
    assert features.name == "inception-v3-pool3"
    np.testing.assert_array_equal(features.extract(pil, progress=False), features.extract(images, progress=False))


def test_inception_weights_errors(weights, tmp_path):
    with pytest.raises(CarraraError, match="pass --inception-weights PATH"):
        load_inception(None)
    with pytest.raises(CarraraError, match="is not a file"):
        load_inception(tmp_path / "missing.pth")
    with pytest.raises(CarraraError, match=r"is a pickle file.*--allow-pickle"):  # pytorch-fid's file is a pickle
        load_inception(weights)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(CarraraError, match="unreadable"):
        load_inception(truncated, allow_pickle=True)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(CarraraError, match="not the FID Inception-v3 state dict"):
        load_inception(other, allow_pickle=True)
    with pytest.raises(CarraraError, match="uint8 images"):
        InceptionFeatures(weights, allow_pickle=True).extract(np.zeros((1, 3, 8, 8), np.float32))


def test_resize_clean_matches_clean_fid():
    image = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    got = resize_clean(image)  # (299, 299, 3)
    assert got.shape == (299, 299, 3) and got.dtype == np.float32 and got.min() == 0 and got.max() == 255
    # clean-fid 0.1.35's make_resizer("PIL", False, "bicubic", (299, 299)) on the same image
    assert got.astype(np.float64).sum() == pytest.approx(33545286.8483792, rel=1e-6)
    expected = [[93.37299346923828, 132.36106872558594, 194.34527587890625],  # pixels (0, 0), (150, 100), (298, 298)
                [29.392396926879883, 82.02912902832031, 249.99571228027344],
                [224.7689971923828, 255.0, 112.23343658447266]]
    np.testing.assert_allclose(got[[0, 150, 298], [0, 100, 298]], expected, rtol=1e-6)


def test_resize_clean_equals_live_clean_fid():
    _reference_source("cleanfid.resize", "clean-fid")
    from cleanfid.resize import make_resizer  # only where clean-fid is installed

    image = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_clean(image), make_resizer("PIL", False, "bicubic", (299, 299))(image))
