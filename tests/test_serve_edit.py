"""img2img and inpainting through `carrara serve`'s API: an uploaded picture or a gallery image, a mask, strength;
pixels equal to the `Pipeline` call, the kept region unchanged, edits batched only with like edits, and every
picture the server will not edit refused with a 422 and one line."""
import base64
import io

import numpy as np
import pytest
from PIL import Image
from test_serve_api import client_for, pixels, png_header, wait

from carrara.pipeline import Pipeline

STEPS = 4


@pytest.fixture(scope="module")
def pipe(tiny_diffusion_run):
    return Pipeline.load(tiny_diffusion_run, precision="fp32")


@pytest.fixture
def client(pipe, tmp_path):
    with client_for(pipe, tmp_path / "data") as c:
        yield c


def data_url(image: Image.Image, kind: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=kind)
    return f"data:image/{'jpeg' if kind == 'JPEG' else kind.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def picture(side: int = 16) -> Image.Image:
    """A left-red, right-blue picture: what is kept and what is regenerated can be told apart."""
    a = np.zeros((side, side, 3), np.uint8)
    a[:, : side // 2] = (220, 30, 30)
    a[:, side // 2:] = (30, 30, 220)
    return Image.fromarray(a)


def right_half_mask(side: int = 16) -> Image.Image:
    a = np.zeros((side, side), np.uint8)
    a[:, side // 2:] = 255
    return Image.fromarray(a, "L")


def test_img2img_from_an_upload_is_the_pipelines_image(client, pipe):
    body = {"prompt": "a blue square", "steps": STEPS, "seed": 3, "sampler": "ddim", "strength": 0.5,
            "init_image": data_url(picture())}
    job = wait(client, client.post("/api/generate", json=body).json()["id"])
    assert job["status"] == "done" and job["batch_jobs"] == 1 and job["total"] == 2  # strength 0.5 of 4 steps
    s = job["images"][0]["settings"]
    assert (s["edit"], s["strength"], s["init_image"]) == ("img2img", 0.5, "upload")
    expected = pipe(["a blue square"], steps=STEPS, seed=3, sampler="ddim", init_image=picture(), strength=0.5)[0]
    assert np.array_equal(pixels(client.get(job["images"][0]["url"]).content), np.asarray(expected))
    txt2img = pipe(["a blue square"], steps=STEPS, seed=3, sampler="ddim")[0]
    assert not np.array_equal(np.asarray(expected), np.asarray(txt2img))  # the init image mattered


def test_inpainting_a_gallery_image_keeps_the_unmasked_half(client, pipe, tmp_path):
    first = wait(client, client.post("/api/generate", json={"prompt": "a red circle", "steps": STEPS}).json()["id"])
    item = first["images"][0]
    init = Image.open(io.BytesIO(client.get(item["url"]).content)).convert("RGB")
    body = {"prompt": "a green triangle", "steps": STEPS, "seed": 9, "init_image_id": item["id"],
            "mask": data_url(right_half_mask())}
    job = wait(client, client.post("/api/generate", json=body).json()["id"])
    assert job["status"] == "done"
    s = job["images"][0]["settings"]
    assert (s["edit"], s["strength"], s["init_image"]) == ("inpaint", 1.0, f"gallery:{item['id']}")  # the default
    got = pixels(client.get(job["images"][0]["url"]).content)
    expected = pipe(["a green triangle"], steps=STEPS, seed=9, init_image=init, mask=right_half_mask())[0]
    assert np.array_equal(got, np.asarray(expected))
    assert np.array_equal(got[:, :8], np.asarray(init)[:, :8])  # the kept half is the init image's own pixels
    assert not np.array_equal(got[:, 8:], np.asarray(init)[:, 8:])
    (tmp_path / "edit.png").write_bytes(client.get(job["images"][0]["url"]).content)
    with Image.open(tmp_path / "edit.png") as im:
        assert "Denoising strength: 1" in im.text["parameters"]


def test_edits_batch_only_with_edits_of_the_same_kind(client):
    client.app.state.jobs.pause()
    base = {"prompt": "a red circle", "steps": STEPS, "seed": "random"}
    init = {"init_image": data_url(picture()), "strength": 0.75}
    bodies = [{**base, **init}, base, {**base, **init, "init_image": data_url(picture().rotate(90))},
              {**base, **init, "mask": data_url(right_half_mask())}, {**base, **init, "strength": 0.5}]
    ids = [client.post("/api/generate", json=b).json()["id"] for b in bodies]
    client.app.state.jobs.resume()
    jobs = [wait(client, i) for i in ids]
    assert [j["status"] for j in jobs] == ["done"] * 5
    assert [j["batch_jobs"] for j in jobs] == [2, 1, 2, 1, 1]  # the two img2img jobs at 0.75 share one call


def test_a_jpeg_of_another_shape_is_centre_cropped_by_the_pipeline(client, pipe):
    wide = picture(48).resize((48, 24))
    job = wait(client, client.post("/api/generate", json={"prompt": "a", "steps": STEPS, "strength": 0.5,
                                                          "init_image": data_url(wide, "JPEG")}).json()["id"])
    assert job["status"] == "done" and job["images"][0]["size"] == [16, 16]


def gif() -> bytes:
    buf = io.BytesIO()
    picture().save(buf, format="GIF")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


HOSTILE = {
    "not a data URL": ({"init_image": "/etc/passwd"}, 'init_image: not a PNG or JPEG data URL ("data:image/png;base64,…")'),
    "a GIF data URL": ({"init_image": "data:image/gif;base64,R0lG"}, "init_image: not a PNG or JPEG data URL"),
    "bad base64": ({"init_image": "data:image/png;base64,@@@@"}, "init_image: not valid base64"),
    "GIF bytes": ({"init_image": b64(gif())}, "init_image: a GIF image; send a PNG or JPEG"),
    "not an image": ({"init_image": b64(b"hello world")}, "init_image: not a PNG or JPEG image"),
    "too large": ({"init_image": b64(b"\0" * (2 * 2**20 + 3))}, "init_image: larger than 2 MiB"),
    "a bomb": ({"init_image": b64(png_header(20_000, 20_000))}, "init_image: too many pixels (a decompression bomb?)"),
    "too wide": ({"init_image": b64(png_header(5000, 10))}, "init_image: 5000×10 pixels; at most 4096 a side"),
    "truncated": ({"init_image": b64(base64.b64decode(data_url(picture())[22:])[:60])}, "init_image: a damaged image"),
    "mask of another size": ({"init_image": data_url(picture()), "mask": data_url(right_half_mask(32))},
                             "mask: 32×32 pixels, the init image 16×16: paint the mask on the init image, at its size"),
    "unknown gallery id": ({"init_image_id": "0" * 32}, f"init_image_id: no image {'0' * 32} in the gallery"),
    "mask alone": ({"mask": data_url(right_half_mask())}, "mask needs an init image to edit"),
    "strength alone": ({"strength": 0.5}, "strength needs an init image to edit"),
    "both inits": ({"init_image": data_url(picture()), "init_image_id": "0" * 32},
                   "give init_image or init_image_id, not both"),
    "strength 0": ({"init_image": data_url(picture()), "strength": 0}, "strength"),
    "strength 1.5": ({"init_image": data_url(picture()), "strength": 1.5}, "strength"),
    "a path as id": ({"init_image_id": "../../etc/passwd"}, "init_image_id"),
}


@pytest.mark.parametrize("body, message", HOSTILE.values(), ids=HOSTILE.keys())
def test_pictures_the_server_will_not_edit_are_422_with_one_line(client, body, message):
    r = client.post("/api/generate", json={"prompt": "a", "steps": 1, **body})
    assert r.status_code == 422, r.text
    assert message in r.json()["message"] and "\n" not in r.json()["message"]
    assert client.get("/api/health").json()["jobs"]["queued"] == 0
