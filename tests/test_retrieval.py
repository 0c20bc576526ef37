"""CLIP retrieval: the index finds an image from its own embedding and a caption's images from the caption's words,
faiss and the exact torch search agree, and a missing, foreign or stale index or a bad query is one clear line."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from carrara.cli import main
from carrara.errors import CarraraError
from carrara.evaluate.retrieval import ClipIndex, ExactIndex, embed_query, make_index, search
from carrara.models.clip import ClipConfig, ClipModel, ClipScorer


@pytest.fixture(scope="module")
def built(tiny_shapes, tiny_clip_run, tmp_path_factory):
    scorer = ClipScorer.load(tiny_clip_run[0])
    index = ClipIndex.build(tiny_shapes, scorer, tiny_clip_run[0], progress=False)
    path = index.save(tmp_path_factory.mktemp("index") / "shapes.safetensors")
    return path, scorer


def test_an_image_finds_itself_first(built):
    path, scorer = built
    index = ClipIndex.load(path)
    scores, idx = index.search(torch.from_numpy(index.embeddings), 1)
    same = [np.array_equal(index.embeddings[j], index.embeddings[i]) for i, j in enumerate(idx[:, 0])]
    assert all(same) and np.allclose(scores[:, 0], 1.0, atol=1e-5)  # itself (or a pixel-identical twin), cos 1
    # through the query path: the picture file is read, squared and embedded again
    result = search(index, scorer, str(index.root / index.files[5]), k=3)
    assert result["kind"] == "image" and result["hits"][0]["file"] == index.files[5]
    assert result["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_a_caption_finds_its_images_in_the_top_5(built):
    path, scorer = built
    index = ClipIndex.load(path)
    captions = sorted(set(index.texts))
    found = [any(h["text"] == c for h in search(index, scorer, c, k=5)["hits"]) for c in captions]
    chance = np.mean([1 - np.prod([(len(index.texts) - index.texts.count(c) - j) / (len(index.texts) - j)
                                   for j in range(5)]) for c in captions])
    assert np.mean(found) >= 0.6 and np.mean(found) > chance + 0.4, (np.mean(found), chance)


def test_faiss_and_the_exact_search_agree(built):
    index = ClipIndex.load(built[0])
    queries = np.random.default_rng(0).standard_normal((5, index.embeddings.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    s1, i1 = make_index(index.embeddings).search(queries, 7)
    s2, i2 = ExactIndex(index.embeddings).search(queries, 7)
    assert type(make_index(index.embeddings)).__name__ == "IndexFlatIP"
    assert np.array_equal(i1, i2) and np.allclose(s1, s2, atol=1e-5)
    assert np.allclose(s2, np.sort(queries @ index.embeddings.T, axis=1)[:, ::-1][:, :7], atol=1e-5)


def test_the_cli_searches_and_writes_a_sheet(built, tmp_path, capsys):
    path, _ = built
    index = ClipIndex.load(path)
    sheet = tmp_path / "sheet.png"
    assert main(["search", str(index.root / index.files[0]), "--index", str(path), "--k", "4", "-o", str(sheet)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[2] == str(index.root / index.files[0]) and "ms after loading" in out[-1]
    assert len([line for line in out if line.strip()[:2].rstrip(".").isdigit()]) == 4
    assert Image.open(sheet).size[0] > 4 * 64
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("query, message", [("   ", "query is empty"), ("missing.png", "no such file"),
                                            ("NOT_AN_IMAGE", "not an image file")])
def test_bad_queries_are_one_line(built, tmp_path, capsys, query, message):
    if query == "NOT_AN_IMAGE":
        query = str(tmp_path / "notes.png")
        (tmp_path / "notes.png").write_text("not a picture")
    assert main(["search", query, "--index", str(built[0]), "-o", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("carrara: error:") and message in err and len(err.strip().splitlines()) == 1


def test_missing_foreign_and_stale_indexes_are_refused(built, tiny_shapes, tiny_clip_run, tmp_path, capsys):
    path, scorer = built
    assert main(["search", "a red circle", "--index", str(tmp_path / "none.safetensors")]) == 2
    assert "no index at" in capsys.readouterr().err
    other = ClipScorer(ClipModel(ClipConfig(image_size=16, channels=(8, 16), embed_dim=32, groups=4)),
                       scorer.text_encoder)
    with pytest.raises(CarraraError, match="built with another CLIP"):
        ClipIndex.load(path).check_clip(other)
    with pytest.raises(CarraraError, match="not a carrara CLIP index"):
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
        ClipIndex.load(tmp_path / "x.safetensors")
    data = tmp_path / "data"  # a private copy: this test changes a file
    shutil.copytree(tiny_shapes, data)
    assert main(["index", str(data), "--clip", str(tiny_clip_run[0]), "--out", str(tmp_path / "i.safetensors"),
                 "--quiet"]) == 0
    assert "indexed 48 images" in capsys.readouterr().out
    victim = data / ClipIndex.load(tmp_path / "i.safetensors").files[0]
    Image.new("RGB", (16, 16), (0, 0, 0)).save(victim)
    os.utime(victim, ns=(1, 1))  # a different file with a different mtime
    assert main(["search", "a red circle", "--index", str(tmp_path / "i.safetensors")]) == 2
    assert "is stale" in capsys.readouterr().err


def test_text_and_image_queries_share_one_space(built):
    """A caption's text vector and its image's vector are the CLIP's own embeddings (unit, same size)."""
    _, scorer = built
    v = embed_query(scorer, "a red circle")
    assert v.shape == (1, scorer.model.config.embed_dim) and torch.allclose(v.norm(), torch.tensor(1.0))
    assert torch.allclose(v, scorer.embed_texts(["a red circle"]))
