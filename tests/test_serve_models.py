"""`carrara serve --models DIR`: the models the page switches between, loaded on first use, at most `max_loaded` in
memory, jobs batched only with jobs of their model, and each gallery image recording the model that made it."""
import shutil

import numpy as np
import pytest
from test_cli_generate import one_error_line, write_tiny_model
from test_serve_api import client_for, pixels, wait

import carrara.modelfolder
import carrara.serve.models
from carrara.cli import main
from carrara.errors import CarraraError
from carrara.modelfolder import PACKAGED
from carrara.pipeline import Pipeline
from carrara.png import read_png_metadata
from carrara.serve.models import discover


@pytest.fixture(scope="module")
def models_dir(tiny_diffusion_run, tmp_path_factory):
    """A folder holding a random tiny model ("other"), a copy of the tiny run under the packaged name "default",
    a folder that is no model and a stray file."""
    root = tmp_path_factory.mktemp("models")
    write_tiny_model(root / "other")
    shutil.copytree(tiny_diffusion_run, root / "default", ignore=shutil.ignore_patterns("checkpoints", "samples"))
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a model")
    (root / "stray.txt").write_text("x")
    return root


@pytest.fixture(scope="module")
def pipe(tiny_diffusion_run):
    return Pipeline.load(tiny_diffusion_run, precision="fp32")


class CountingLoad:
    """Pipeline.load, counted: which folders the server loaded after start-up."""

    def __init__(self):
        self.paths = []

    def __call__(self, path):
        self.paths.append(str(path))
        return Pipeline.load(path, precision="fp32")


def test_discover_lists_started_packaged_and_folder_models(tiny_diffusion_run, models_dir):
    choices = discover(str(tiny_diffusion_run), models_dir)
    packaged = sorted(sub.name for sub in PACKAGED.iterdir() if (sub / "model_index.json").is_file())
    fast = [f"{name}-fast" for name in packaged if (PACKAGED / name / "student" / "model_index.json").is_file()]
    assert [c.name for c in choices] == [tiny_diffusion_run.name, *packaged, f"{models_dir.name}/default", "other",
                                         *fast]  # a packaged model's student is offered after every model
    assert all(c.fast == c.name.endswith("-fast") for c in choices)
    assert choices[0].ref == str(tiny_diffusion_run.resolve()) and choices[-1 - len(fast)].ref == str(models_dir / "other")
    assert next(c for c in choices if c.name == "default").ref == "default"  # the packaged one, as PNGs record it
    again = discover(str(models_dir / "other"), models_dir)  # the started model is listed once, under its name
    assert [c.name for c in again].count("other") == 1 and again[0].name == "other"


def test_packaged_shapes_model_is_listed_and_recorded_by_name(tiny_diffusion_run, tmp_path, monkeypatch):
    """A second packaged model (carrara/assets/shapes) is offered as "shapes" and recorded so (`--from` reloads it)."""
    package = tmp_path / "assets"
    write_tiny_model(package / "shapes")
    monkeypatch.setattr(carrara.modelfolder, "PACKAGED", package)
    monkeypatch.setattr(carrara.serve.models, "PACKAGED", package)
    choices = discover(str(tiny_diffusion_run))
    assert [(c.name, c.path, c.ref) for c in choices[1:]] == [("shapes", "shapes", "shapes")]
    started = discover("shapes")
    assert [(c.name, c.ref) for c in started] == [("shapes", "shapes")]  # started by name: listed once


@pytest.mark.parametrize("where, words", [("nope", "no such folder"), ("stray.txt", "is not a folder")])
def test_a_bad_models_folder_is_one_line(tiny_diffusion_run, models_dir, tmp_path, capsys, where, words):
    with pytest.raises(CarraraError, match=words):
        discover(str(tiny_diffusion_run), models_dir / where)
    assert main(["serve", "--model", str(tiny_diffusion_run), "--models", str(models_dir / where), "--port", "0",
                 "--data-dir", str(tmp_path)]) == 2
    assert words in one_error_line(capsys)


def test_switching_models_loads_on_first_use_and_records_the_model(pipe, models_dir, tmp_path):
    load = CountingLoad()
    with client_for(pipe, tmp_path, models_dir=models_dir, load=load) as c:
        listed = c.get("/api/models").json()
        assert listed["default"] == pipe.name.rsplit("/", 1)[-1] and listed["max_loaded"] == 2
        names = [m["name"] for m in listed["models"]]
        assert "other" in names and "notes" not in names and listed["models"][0]["loaded"] is True
        assert not any(m["loaded"] for m in listed["models"][1:]) and load.paths == []

        settings = {"prompt": "a red circle", "steps": 3, "sampler": "ddim", "guidance": 2.0, "seed": 11}
        job = wait(c, c.post("/api/generate", json={**settings, "model": "other"}).json()["id"])
        assert job["status"] == "done" and job["settings"]["model"] == "other"
        assert load.paths == [str(models_dir / "other")]
        item = job["images"][0]
        assert item["settings"]["model"] == "other" and item["model"] == str(models_dir / "other")
        (tmp_path / "other.png").write_bytes(c.get(item["url"]).content)
        model = c.get("/api/model?name=other").json()
        assert model["name"] == "other" and model["sizes"] == [16] and model["model_hash"] == item["model_hash"]
        assert load.paths == [str(models_dir / "other")]  # in memory already: not loaded again
        default = wait(c, c.post("/api/generate", json=settings).json()["id"])
        assert default["settings"]["model"] == listed["default"] and default["images"][0]["model_hash"] == pipe.model_hash
    other = Pipeline.load(models_dir / "other", precision="fp32")
    assert item["model_hash"] == other.model_hash != pipe.model_hash
    expected = other([settings["prompt"]], steps=3, sampler="ddim", guidance=2.0, seed=11)[0]
    assert np.array_equal(pixels(tmp_path / "other.png"), np.asarray(expected))  # made by "other", not the default
    meta = read_png_metadata(tmp_path / "other.png")
    assert meta["model"] == str(models_dir / "other") and meta["model_name"] == "other"


def test_at_most_max_loaded_models_stay_in_memory_the_started_one_always(pipe, models_dir, tmp_path):
    load = CountingLoad()
    with client_for(pipe, tmp_path, models_dir=models_dir, load=load) as c:
        start, copy = c.app.state.models.default, f"{models_dir.name}/default"
        for name, in_memory in (("other", [start, "other"]), (start, ["other", start]), (copy, [start, copy]),
                                ("other", [start, "other"])):
            job = wait(c, c.post("/api/generate", json={"prompt": "a", "steps": 1, "model": name}).json()["id"])
            assert job["status"] == "done" and c.app.state.models.loaded() == in_memory
        # the started model (it may carry --lora adapters) is never dropped; the others take turns in one place
        assert load.paths == [str(models_dir / "other"), str(models_dir / "default"), str(models_dir / "other")]


def test_jobs_batch_only_with_jobs_of_their_model(pipe, models_dir, tmp_path):
    with client_for(pipe, tmp_path, models_dir=models_dir, load=CountingLoad()) as c:
        c.get("/api/model?name=other")  # loaded before the queue is paused
        c.app.state.jobs.pause()
        body = {"prompt": "a red circle", "steps": 2, "seed": "random"}
        ids = [c.post("/api/generate", json={**body, **extra}).json()["id"]
               for extra in ({}, {"model": "other"}, {}, {"model": "other"})]
        c.app.state.jobs.resume()
        jobs = [wait(c, i) for i in ids]
    assert [j["batch_jobs"] for j in jobs] == [2, 2, 2, 2]
    assert {j["images"][0]["model_hash"] for j in jobs[::2]} == {pipe.model_hash}
    assert pipe.model_hash not in {j["images"][0]["model_hash"] for j in jobs[1::2]}


def test_unknown_or_broken_models_are_refused_with_a_message(pipe, models_dir, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(models_dir / "other", broken / "broken")
    (broken / "broken" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with client_for(pipe, tmp_path / "data", models_dir=broken) as c:
        r = c.post("/api/generate", json={"prompt": "a", "model": "nope"})
        assert r.status_code == 422 and r.json()["message"].startswith("model: no model 'nope'; choose one of ")
        r = c.get("/api/model?name=nope")
        assert r.status_code == 404 and "broken" in r.json()["message"]
        r = c.post("/api/generate", json={"prompt": "a", "model": "broken"})
        assert r.status_code == 503 and r.json()["message"].startswith("model 'broken' cannot be loaded: ")
        assert "\n" not in r.json()["message"]
        assert wait(c, c.post("/api/generate", json={"prompt": "a", "steps": 1}).json()["id"])["status"] == "done"
