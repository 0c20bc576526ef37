"""Diffusion-stage caption variants and concept-balanced batches (train/diffusion.py)."""
from collections import Counter

import pytest
import torch

from carrara.data.folder import Record
from carrara.errors import CarraraError
from carrara.train.captions import balanced_batches, caption_list, variant_table
from carrara.train.core import TrainConfig


def test_caption_list_puts_the_caption_first_and_drops_repeats_and_junk():
    r = Record("a.png", "cat face", {"captions": ["cat face", " cat ", "", 3, "cat"]})
    assert caption_list(r, "captions") == ["cat face", "cat"]
    assert caption_list(r, "") == ["cat face"]
    assert caption_list(Record("b.png", "dog", {}), "captions") == ["dog"]


def test_variant_table_pads_with_the_first_caption():
    table, counts = variant_table([["a", "b", "c"], ["d"]], [4, 0, 2, 3])
    assert table.tolist() == [[4, 0, 2], [3, 3, 3]] and counts.tolist() == [3, 1]


def test_balanced_batches_give_each_group_an_equal_share_and_replay_exactly():
    # group "tone" has 9 examples (indices 0-8), "cat" one (index 9): uniform sampling would give "cat" 10 %.
    records = [Record(f"{i}.png", "x", {"base": "tone"}) for i in range(9)] + [Record("9.png", "cat", {"base": "cat"})]
    batch_fn = balanced_batches(records, "base", TrainConfig(batch_size=64, seed=3))
    drawn = torch.cat([batch_fn(step) for step in range(200)])
    share_cat = (drawn == 9).float().mean().item()
    assert abs(share_cat - 0.5) < 0.03
    within = Counter(drawn[drawn < 9].tolist())  # examples inside a group are drawn uniformly
    assert max(within.values()) / min(within.values()) < 1.3
    assert torch.equal(batch_fn(17), batch_fn(17))  # a pure function of the step: exact resume


def test_balancing_by_a_missing_field_is_one_clear_error():
    with pytest.raises(CarraraError, match="balance_by='base'"):
        balanced_batches([Record("a.png", "x", {})], "base", TrainConfig())
