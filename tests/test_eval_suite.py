"""`carrara eval`: the numbers it reports are the metrics of the images it generated, named by their features."""
import json

import numpy as np
import pytest
import torch

from carrara.errors import CarraraError
from carrara.evaluate.suite import EvalSettings, bootstrap_interval, run_eval


@pytest.fixture(scope="module")
def report(tiny_shapes, tiny_diffusion_run, tiny_clip_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    settings = EvalSettings(model=str(tiny_diffusion_run), data=str(tiny_shapes), n=12, clip=str(tiny_clip_run[0]),
                            metrics=("fd", "kid", "clipscore"), steps=3, batch_size=5, bootstrap=8)
    with pytest.warns(UserWarning, match="subset"):  # KID's subset size is clipped to the 12 samples
        run_eval(settings, out, progress=False)
    return out, settings


def test_report_names_each_number_by_its_features_and_counts(report, tiny_clip_run):
    out, _ = report
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    name = f"carrara-clip[{tiny_clip_run[0].name}]"
    assert set(metrics) == {f"FD[{name}, n_gen=12, n_real=48]", f"KID[{name}, n_gen=12, n_real=48, subset=12]",
                            f"CLIPScore[{name}, generated]", f"CLIPScore[{name}, real]"}
    assert not any(k.startswith("FID") for k in metrics)  # only Inception features make a FID
    for m in metrics.values():
        assert np.isfinite(m["value"])
        if "ci95" in m:
            assert m["ci95"][0] <= m["ci95"][1]
    html = (out / "report.html").read_text()
    assert all(k in html for k in metrics) and "samples.png" in html
    assert (out / "samples.png").is_file()


def test_reported_fd_and_clip_score_are_those_of_the_generated_images(report, tiny_shapes, tiny_clip_run):
    """Recompute from scratch: the same captions and seeds through the pipeline, then the metric functions."""
    import random

    from carrara.data.folder import load_folder
    from carrara.data.load import preload_images
    from carrara.evaluate.fid import feature_stats, frechet_distance
    from carrara.models.clip import ClipScorer, clip_score
    from carrara.pipeline import Pipeline

    out, s = report
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    real, texts = preload_images(load_folder(tiny_shapes), progress=False)
    rng = random.Random(s.seed)
    prompts = [texts[rng.randrange(len(texts))] for _ in range(s.n)]
    pipe = Pipeline.load(s.model)
    fake = torch.cat([pipe(prompts[j:j + s.batch_size], steps=s.steps, guidance=s.guidance, seed=s.seed + j,
                           output="tensor") for j in range(0, s.n, s.batch_size)])
    fake = ((fake.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    scorer = ClipScorer.load(tiny_clip_run[0])
    f_fake, f_real = scorer.embed_images(fake).double().numpy(), scorer.embed_images(real).double().numpy()
    fd = frechet_distance(*feature_stats(f_real), *feature_stats(f_fake))
    (fd_key,) = [k for k in metrics if k.startswith("FD[")]
    assert metrics[fd_key]["value"] == pytest.approx(fd, rel=1e-4)
    (cs_key,) = [k for k in metrics if k.endswith("generated]")]
    expected = clip_score(scorer.embed_images(fake), scorer.embed_texts(prompts)).mean().item()
    assert metrics[cs_key]["value"] == pytest.approx(expected, abs=1e-3)


def test_bootstrap_interval_is_the_percentile_interval_of_resampled_statistics():
    a = np.arange(100.0)
    lo, hi = bootstrap_interval(np.mean, a, n=200, seed=0)
    rng = np.random.default_rng(0)
    means = [a[rng.integers(0, 100, 100)].mean() for _ in range(200)]
    bias = np.mean(means) - a.mean()  # ~0 for a mean: the plain percentile interval, barely shifted
    assert (lo, hi) == pytest.approx((np.percentile(means, 2.5) - bias, np.percentile(means, 97.5) - bias))
    assert abs(bias) < 0.5 and lo < a.mean() < hi and hi - lo < 20  # the standard error of the mean is ~2.9


def test_bootstrap_interval_of_a_biased_statistic_contains_the_estimate():
    """FD of resampled sets is inflated by duplicates: the interval is recentred, so it holds the estimate."""
    from carrara.evaluate.fid import feature_stats, frechet_distance

    rng = np.random.default_rng(1)
    fake, real = rng.standard_normal((200, 8)), rng.standard_normal((2000, 8))

    def fd(x, y):
        return frechet_distance(*feature_stats(y), *feature_stats(x))

    estimate = fd(fake, real)
    lo, hi = bootstrap_interval(fd, fake, real, n=100, seed=0)
    resampled = []
    rng = np.random.default_rng(0)
    for _ in range(100):
        ia = rng.integers(0, 200, 200)
        resampled.append(fd(fake[ia], real[rng.integers(0, 2000, 2000)]))
    assert np.percentile(resampled, 2.5) > estimate  # the plain percentile interval would miss the estimate
    assert lo < estimate < hi
    assert hi - lo == pytest.approx(np.percentile(resampled, 97.5) - np.percentile(resampled, 2.5))


@pytest.mark.parametrize("settings, message", [
    ({"metrics": ("fd",), "clip": None}, "need a feature network"),
    ({"metrics": ("clipscore",), "clip": None}, "clipscore needs --clip"),
    ({"metrics": ("fd",), "data": None}, "need --data"),
    ({"metrics": ("fid",)}, "unknown"),
    ({"metrics": ("fd",), "n": 1}, "at least 2 generated images"),
])
def test_missing_pieces_are_one_clear_error(settings, message, tmp_path):
    base = {"model": str(tmp_path), "data": str(tmp_path), "clip": str(tmp_path)}
    with pytest.raises(CarraraError, match=message):
        run_eval(EvalSettings(**{**base, **settings}), tmp_path / "out", progress=False)


def test_retrieval_on_a_prompts_file_is_that_of_the_generated_images(tiny_shapes, tiny_diffusion_run, tiny_clip_run,
                                                                      tmp_path):
    from carrara.models.clip import ClipScorer, retrieval
    from carrara.pipeline import Pipeline

    prompts = ["a large red circle on the left", "a small blue square at the top", "a green star",
               "a yellow triangle at the bottom", "a purple diamond", "an orange cross in the center"]
    (tmp_path / "prompts.txt").write_text("# paraphrases\n" + "\n".join(prompts) + "\n\n")
    settings = EvalSettings(model=str(tiny_diffusion_run), data=str(tiny_shapes), n=6, clip=str(tiny_clip_run[0]),
                            prompts=str(tmp_path / "prompts.txt"), metrics=("retrieval",), steps=2, batch_size=6,
                            bootstrap=8)
    metrics = run_eval(settings, tmp_path / "out", progress=False)["metrics"]
    name = f"carrara-clip[{tiny_clip_run[0].name}]"
    assert set(metrics) == {f"T2I-top1[{name}, among generated, n_gen=6]", f"T2I-top5[{name}, among generated, n_gen=6]"}
    fake = Pipeline.load(tiny_diffusion_run)(prompts, steps=2, guidance=settings.guidance, seed=0, output="tensor")
    scorer = ClipScorer.load(tiny_clip_run[0])
    expected = retrieval(scorer.embed_images(((fake.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)), prompts,
                         scorer.embed_texts)
    assert metrics[f"T2I-top1[{name}, among generated, n_gen=6]"]["value"] == pytest.approx(expected["t2i_top1"])
    assert metrics[f"T2I-top5[{name}, among generated, n_gen=6]"]["value"] == pytest.approx(expected["t2i_top5"])


def test_an_empty_prompts_file_is_one_clear_error(tmp_path):
    (tmp_path / "p.txt").write_text("# nothing\n\n")
    with pytest.raises(CarraraError, match="no prompts"):
        run_eval(EvalSettings(model=str(tmp_path), data=str(tmp_path), clip=str(tmp_path), prompts=str(tmp_path / "p.txt"),
                              metrics=("retrieval",)), tmp_path / "out", progress=False)
