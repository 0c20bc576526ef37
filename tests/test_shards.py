"""Tar shards: brace patterns, the WebDataset layout (read back by webdataset itself), training equal to the folder's."""
import io
import json

import numpy as np
import pytest
import torch
from conftest import TINY_VAE
from PIL import Image
from safetensors.torch import load_file

from carrara.cli import main
from carrara.data.folder import load_folder
from carrara.data.shards import expand_braces, load_shards, shard_paths, write_shards
from carrara.errors import CarraraError
from carrara.train.autoencoder import AutoencoderRecipe, train_autoencoder
from carrara.train.core import TrainConfig


def test_brace_expansion_matches_braceexpand():
    braceexpand = pytest.importorskip("braceexpand").braceexpand  # what webdataset expands URLs with
    for pattern in ["s/{000000..000011}.tar", "s/{8..11}.tar", "s/{a,b}-{01..03}.tar", "s/{3..1}.tar", "plain.tar"]:
        assert expand_braces(pattern) == list(braceexpand(pattern)), pattern
    assert expand_braces("s/{000008..000010}.tar") == ["s/000008.tar", "s/000009.tar", "s/000010.tar"]


@pytest.fixture(scope="module")
def shards(tiny_shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return out, write_shards(tiny_shapes, out, per_shard=20, progress=False)


def test_shard_writes_webdataset_tars_that_webdataset_reads(tiny_shapes, shards, tmp_path):
    wds = pytest.importorskip("webdataset")
    out, stats = shards
    assert stats == {"shards": 3, "samples": 48, "pattern": str(out / "{000000..000002}.tar"), "skipped": {}}
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "000001.tar", "000002.tar"]  # no temp files left
    folder = load_folder(tiny_shapes)
    samples = list(wds.WebDataset(stats["pattern"], shardshuffle=False, empty_check=False))
    assert len(samples) == 48
    for i, sample in enumerate(samples):
        record = folder.records[i]
        assert sample["__key__"] == f"{i:09d}" and sample["txt"].decode() == record.text
        assert json.loads(sample["json"]) == {**record.extra, "file_name": record.file_name}
        pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(sample["png"])))).permute(2, 0, 1)
        assert torch.equal(pixels, folder.image_uint8(i))  # lossless
    write_shards(tiny_shapes, tmp_path, per_shard=20, progress=False)
    assert all((tmp_path / n).read_bytes() == (out / n).read_bytes() for n in ("000000.tar", "000002.tar"))


def test_loaded_shards_equal_the_folder(tiny_shapes, shards):
    out, stats = shards
    folder, ds = load_folder(tiny_shapes, size=8), load_shards(stats["pattern"], size=8)
    assert [r.text for r in ds.records] == [r.text for r in folder.records]
    assert [r.extra for r in ds.records] == [r.extra for r in folder.records]
    assert all(torch.equal(ds.image_uint8(i), folder.image_uint8(i)) for i in range(48))
    assert ds.records[21].file_name == "000001.tar#000000021"
    assert len(load_shards(str(out / "00000[02].tar"))) == 28  # globs work too


def test_training_on_shards_equals_training_on_the_folder(tiny_shapes, shards, tmp_path):
    def run(data, out):
        recipe = AutoencoderRecipe(data=str(data), size=16, model=dict(TINY_VAE),
                                   train=TrainConfig(steps=3, batch_size=8, lr=2e-3, warmup_steps=1, log_every=1,
                                                     checkpoint_every=10, sample_every=10, bf16=False))
        train_autoencoder(recipe, out, progress=False)
        return load_file(out / "checkpoints" / "step_0000003" / "model.safetensors")

    a, b = run(tiny_shapes, tmp_path / "folder"), run(shards[1]["pattern"], tmp_path / "shards")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "shards" / "checkpoints" / "step_0000003" / "state.json").read_text())
    assert state["data"]["samples_seen"] == 24 and state["data"]["examples"] == 48


def test_shard_cli_and_its_errors(tiny_shapes, shards, tmp_path, capsys):
    assert main(["data", "shard", str(tiny_shapes), "--out", str(tmp_path), "--size", "48", "--quiet"]) == 0
    assert f"wrote 48 samples in 1 shards: --data '{tmp_path / '000000.tar'}'" in capsys.readouterr().out
    assert main(["data", "shard", str(tiny_shapes), "--out", str(tmp_path), "--quiet"]) == 2
    assert "already holds .tar shards" in capsys.readouterr().err
    with pytest.raises(CarraraError, match="no shard matches"):
        shard_paths(str(tmp_path / "nothing-*.tar"))
