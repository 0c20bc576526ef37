"""`carrara serve --index`: POST /api/search by words, a picture or a gallery image on the tiny CLIP and the tiny shapes
index, against `evaluate.retrieval.search` and brute force; the indexed files are served, nothing else; a missing,
stale or foreign index is one line at start-up, and every bad query a 422 with one line."""
import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_serve_api import client_for, metadata, wait

import carrara.serve.app as serve_app
from carrara.cli import main
from carrara.evaluate.retrieval import ClipIndex, files_signature, is_image_query, make_index, search
from carrara.images import from_pil, to_uint8
from carrara.models.clip import ClipScorer
from carrara.pipeline import Pipeline
from carrara.serve.gallery import Gallery
from carrara.serve.search import NO_INDEX, Searcher


@pytest.fixture(scope="module")
def pipe(tiny_diffusion_run):
    return Pipeline.load(tiny_diffusion_run)


@pytest.fixture(scope="module")
def index_file(tiny_shapes, tiny_clip_run, tmp_path_factory):
    """The tiny shapes folder indexed by the tiny CLIP, as `carrara index` writes it."""
    index = ClipIndex.build(tiny_shapes, ClipScorer.load(tiny_clip_run[0]), tiny_clip_run[0], progress=False)
    return index.save(tmp_path_factory.mktemp("index") / "shapes.safetensors")


@pytest.fixture(scope="module")
def searcher(index_file):
    return Searcher.load(index_file)


@pytest.fixture
def client(pipe, searcher, tmp_path):
    with client_for(pipe, tmp_path / "data", searcher=searcher) as c:
        yield c


def captions(folder: Path) -> dict[str, str]:
    """file → caption, read from the folder's metadata.jsonl (not from the index)."""
    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return {row["file_name"]: row["text"] for row in map(json.loads, lines)}


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_text_finds_the_images_of_its_caption_first(pipe, searcher, tmp_path):
    """An index whose vector for each image is its caption's CLIP text embedding: a caption must bring back exactly
    its own images first, at cosine 1, whatever the tiny CLIP learned — and each file named with its own caption."""
    index, scorer = searcher.index, searcher.scorer
    texts = scorer.embed_texts(index.texts).numpy()  # (N, E) unit
    by_caption = ClipIndex(make_index(texts), texts, index.files, index.texts, index.root, index.clip,
                           index.clip_fingerprint, index.signature)
    truth = captions(index.root)
    with client_for(pipe, tmp_path, searcher=Searcher(by_caption, scorer)) as c:
        for caption in sorted(set(index.texts))[:6]:
            own = sum(t == caption for t in truth.values())
            r = c.post("/api/search", json={"text": caption, "k": own + 1})
            assert r.status_code == 200, r.text
            hits = r.json()["results"]
            assert [h["rank"] for h in hits] == list(range(1, own + 2))
            assert [truth[h["file"]] for h in hits[:own]] == [caption] * own and truth[hits[own]["file"]] != caption
            assert all(h["score"] == pytest.approx(1.0, abs=1e-5) for h in hits[:own]) and hits[own]["score"] < 0.9999
            assert all(h["text"] == truth[h["file"]] for h in hits)


def test_text_search_is_the_cli_search(client, searcher):
    """Through the API, words give the same files and scores as `carrara search` on the same index."""
    for query in ("a red circle", "a small blue square"):
        r = client.post("/api/search", json={"text": query, "k": 5}).json()
        expected = search(searcher.index, searcher.scorer, query, k=5)["hits"]
        assert [h["file"] for h in r["results"]] == [h["file"] for h in expected]
        assert np.allclose([h["score"] for h in r["results"]], [h["score"] for h in expected], atol=1e-6)
        assert r["ms"] > 0


def test_a_picture_finds_itself_first(client, searcher):
    index = searcher.index
    unique = next(i for i in range(len(index.files))
                  if sum(np.array_equal(index.embeddings[i], e) for e in index.embeddings) == 1)
    r = client.post("/api/search", json={"image": data_url(index.root / index.files[unique]), "k": 3})
    assert r.status_code == 200, r.text
    first = r.json()["results"][0]
    assert first["file"] == index.files[unique] and first["score"] == pytest.approx(1.0, abs=1e-4)
    assert first["url"] == f"/api/search/image/{unique}"
    assert client.get(first["url"]).content == (index.root / index.files[unique]).read_bytes()


def test_a_gallery_picture_finds_its_nearest_training_images(pipe, searcher, tmp_path):
    """"Nearest training images" on a generated picture: the API's ranking is brute-force cosine over the index; a
    training image copied into the gallery (memorised) comes back first at cosine 1."""
    index = searcher.index
    copied = index.files[7]
    memorised, = Gallery(tmp_path).add_all([Image.open(index.root / copied)], [metadata(3)], job_id="j")
    with client_for(pipe, tmp_path, searcher=searcher) as c:
        job = wait(c, c.post("/api/generate", json={"prompt": "a red circle", "steps": 4}).json()["id"])
        made = job["images"][0]
        r = c.post("/api/search", json={"image_id": made["id"], "k": 4}).json()["results"]
        picture = Image.open(io.BytesIO(c.get(made["url"]).content))
        side = searcher.scorer.model.config.image_size
        query = searcher.scorer.embed_images(to_uint8(from_pil([picture], side))).numpy()[0]
        cosine = index.embeddings @ query  # (N,), brute force
        assert np.allclose([h["score"] for h in r], np.sort(cosine)[::-1][:4], atol=1e-5)  # the 4 best, in order
        assert np.allclose([cosine[index.files.index(h["file"])] for h in r], [h["score"] for h in r], atol=1e-5)
        first = c.post("/api/search", json={"image_id": memorised["id"], "k": 1}).json()["results"][0]
        assert np.array_equal(index.embeddings[index.files.index(first["file"])],
                              index.embeddings[index.files.index(copied)])  # itself, or a pixel-identical twin
        assert first["score"] == pytest.approx(1.0, abs=1e-4)


def test_search_info_tells_the_page_whether_there_is_an_index(client, pipe, tmp_path):
    assert client.get("/api/search").json() == {"available": True, "images": 48, "k": 8, "max_k": 64}
    with client_for(pipe, tmp_path) as bare:
        assert bare.get("/api/search").json()["available"] is False
        for r in (bare.post("/api/search", json={"text": "a red circle"}), bare.get("/api/search/image/0")):
            assert r.status_code == 404 and r.json()["message"] == NO_INDEX
    assert len(client.post("/api/search", json={"text": "a red circle", "k": 64}).json()["results"]) == 48


def gif_data_url() -> str:
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, format="GIF")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


BAD = [({"text": ""}, "text: the search text is empty"), ({"text": "   "}, "text: the search text is empty"),
       ({"text": "a", "k": 0}, "k must be between 1 and 64, got 0"),
       ({"text": "a", "k": 65}, "k must be between 1 and 64, got 65"),
       ({}, "give one query: text, image or image_id"),
       ({"text": "a", "image_id": "0" * 32}, "give one query: text, image or image_id, not text and image_id"),
       ({"image": "/etc/passwd"}, 'image: not a PNG or JPEG data URL ("data:image/png;base64,…")'),
       ({"image": "data:image/png;base64,!!!"}, "image: not valid base64"),
       ({"image": gif_data_url()}, "image: a GIF image; send a PNG or JPEG"),
       ({"image_id": "0" * 32}, f"image_id: no image {'0' * 32} in the gallery"),
       ({"image_id": "../../etc/passwd"}, "image_id: String should match pattern '^[0-9a-f]{32}$'"),
       ({"text": "a", "path": "/etc/passwd"}, "path: Extra inputs are not permitted"),
       ({"text": "a", "k": "5"}, "k: Input should be a valid integer")]


@pytest.mark.parametrize("body, message", BAD)
def test_bad_queries_are_422_with_one_line(client, body, message):
    r = client.post("/api/search", json=body)
    assert r.status_code == 422 and r.json()["message"] == message


def test_words_that_look_like_a_file_stay_words(client, searcher):
    """`carrara search x.png` reads the file; the server must not read a path a request names: it embeds the words."""
    name = str(searcher.index.root / searcher.index.files[0])
    assert is_image_query(name)  # what the CLI would open
    r = client.post("/api/search", json={"text": name, "k": 2}).json()["results"]
    words = searcher.scorer.embed_texts([name]).numpy()[0]
    assert np.allclose([h["score"] for h in r], np.sort(searcher.index.embeddings @ words)[::-1][:2], atol=1e-5)


def test_only_indexed_files_inside_the_folder_are_served(client, searcher, pipe, tmp_path):
    index = searcher.index
    last = len(index.files) - 1
    assert client.get(f"/api/search/image/{last}").content == (index.root / index.files[last]).read_bytes()
    assert client.get(f"/api/search/image/{last}").headers["content-type"] == "image/png"
    for path in (f"/api/search/image/{last + 1}", "/api/search/image/-1", "/api/search/image/..%2Fmetadata.jsonl",
                 "/api/search/image/0%2F..%2F..%2Fetc%2Fpasswd", "/api/search/image/1e3"):
        assert client.get(path).status_code in (404, 422), path
    # a hand-made index listing files outside its folder (or not images) serves none of them
    root = tmp_path / "root"
    shutil.copytree(index.root, root)
    (tmp_path / "secret.png").write_bytes(b"secret")
    files = ["../secret.png", str(tmp_path / "secret.png"), "metadata.jsonl", index.files[0]]
    vectors = index.embeddings[:4]
    hostile = ClipIndex(make_index(vectors), vectors, files, ["x"] * 4, root, index.clip, index.clip_fingerprint,
                        files_signature(root, files))
    hostile = ClipIndex.load(hostile.save(tmp_path / "hostile.safetensors"))
    with client_for(pipe, tmp_path / "data", searcher=Searcher(hostile, searcher.scorer)) as c:
        assert [c.get(f"/api/search/image/{i}").status_code for i in range(4)] == [404, 404, 404, 200]
        assert c.get("/api/search/image/0").json()["message"] == "no indexed image 0"


def start_error(args: list[str], tmp_path: Path, capsys) -> str:
    """What `carrara serve --index …` says when it stops at start-up (one line, exit 2)."""
    assert main(["serve", "--port", "0", "--data-dir", str(tmp_path / "gallery"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("carrara: error: ") and err.count("\n") == 1, err
    return err


def test_a_bad_index_stops_the_server_with_one_line(index_file, tiny_shapes, tiny_clip_run, tmp_path, capsys):
    def error(index: Path) -> str:
        return start_error(["--index", str(index)], tmp_path, capsys)

    assert "no index at" in error(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not an index")
    assert "cannot read the index" in error(tmp_path / "junk.safetensors")
    index = ClipIndex.load(index_file)
    index.clip_fingerprint = "0" * 16  # an index of another CLIP's weights
    assert "built with another CLIP" in error(index.save(tmp_path / "other.safetensors"))
    index = ClipIndex.load(index_file)
    index.clip = str(tmp_path / "moved-clip")  # the CLIP run it names is gone
    assert "is not a CLIP folder" in error(index.save(tmp_path / "moved.safetensors"))
    data = tmp_path / "data"  # a private copy: an image changes after indexing
    shutil.copytree(tiny_shapes, data)
    stale = ClipIndex.build(data, ClipScorer.load(tiny_clip_run[0]), tiny_clip_run[0], progress=False).save(
        tmp_path / "stale.safetensors")
    victim = data / ClipIndex.load(stale).files[0]
    Image.new("RGB", (16, 16), (0, 0, 0)).save(victim)
    os.utime(victim, ns=(1, 1))  # a different file with a different mtime
    assert "is stale" in error(stale)
    assert not (tmp_path / "gallery").exists()  # stopped before the model and the gallery


def test_serve_index_loads_the_index_into_the_app(tiny_diffusion_run, index_file, tmp_path, capsys, monkeypatch):
    """`carrara serve --index I`: the app it serves answers searches from I, and start-up says so in one line."""
    answers = []

    class Served:
        def __init__(self, app):
            self.app = app

        def run(self, sockets):  # instead of serving until Ctrl-C: one request, then return
            with TestClient(self.app, base_url="http://127.0.0.1") as c:
                answers.append(c.post("/api/search", json={"text": "a red circle", "k": 3}).json())

    monkeypatch.setattr(serve_app, "server", Served)
    assert main(["serve", "--model", str(tiny_diffusion_run), "--index", str(index_file), "--port", "0",
                 "--data-dir", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "search index" in x)
    assert line.startswith(f"carrara serve: search index {index_file}: 48 images of ")
    assert len(answers[0]["results"]) == 3 and answers[0]["results"][0]["url"].startswith("/api/search/image/")
