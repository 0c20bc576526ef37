"""Mean pairwise CLIP distance among a prompt's samples (issue 20's diversity), against scipy's pdist."""
import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from carrara.errors import CarraraError
from carrara.evaluate.diversity import diversity, pairwise_distances


def test_pairwise_distances_equal_scipys_mean_cosine_distance():
    g = torch.Generator().manual_seed(0)
    embeds = torch.nn.functional.normalize(torch.randn(5, 8, 16, generator=g), dim=-1)
    ours = pairwise_distances(embeds)
    theirs = np.array([pdist(p.numpy().astype(np.float64), metric="cosine").mean() for p in embeds])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_identical_samples_have_no_diversity_and_orthogonal_ones_have_one():
    same = torch.nn.functional.normalize(torch.randn(1, 1, 6), dim=-1).expand(3, 4, 6)
    assert np.abs(pairwise_distances(same)).max() < 1e-12
    assert pairwise_distances(torch.eye(4)[None]).tolist() == [1.0]
    result = diversity(torch.cat([same[:2], torch.eye(6)[None, :4].expand(2, 4, 6)]), bootstrap=20)
    assert result["value"] == pytest.approx(0.5) and result["k"] == 4
    assert result["ci95"][0] < 0.5 < result["ci95"][1]  # two prompts at 0, two at 1: resamples differ


def test_one_sample_per_prompt_is_an_error():
    with pytest.raises(CarraraError, match="K ≥ 2"):
        pairwise_distances(torch.randn(3, 1, 8))
