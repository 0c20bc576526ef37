"""A student beside its teacher: the low-bit delta (models/delta.py), `carrara export student`, and sampling with it
(`Pipeline.load(…, fast=True)`, `carrara generate --fast`)."""
import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from carrara.cli import main
from carrara.errors import CarraraError
from carrara.export import export_student
from carrara.models import delta
from carrara.pipeline import Pipeline
from carrara.png import read_png_metadata
from carrara.train.core import TrainConfig
from carrara.train.distill import DistillRecipe, train_distill


def test_rows_are_quantized_within_half_a_step():
    torch.manual_seed(0)
    d = torch.randn(6, 3, 3, 3) * torch.logspace(-4, 0, 6)[:, None, None, None]  # rows of very different sizes
    d[2] = 0
    for bits in (4, 8):
        codes, scale = delta.quantize_rows(d, bits)
        q = 2 ** (bits - 1) - 1
        assert codes.dtype == torch.int8 and codes.abs().max() == q and scale.shape == (6,)
        assert scale[2] == 0 and not codes[2].any()
        err = (delta.dequantize_rows(codes, scale, d.shape) - d).reshape(6, -1).abs().amax(1)
        assert (err <= scale / 2 * (1 + 1e-6) + 1e-12).all()
        assert torch.allclose(scale, d.reshape(6, -1).abs().amax(1) / q)


def test_nibbles_round_trip_every_code_and_odd_lengths():
    codes = torch.arange(-7, 8, dtype=torch.int8)  # 15 codes: odd
    packed = delta.pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 8
    assert packed[0] == (-7 + 8) | ((-6 + 8) << 4)  # the even-indexed code in the low nibble
    assert torch.equal(delta.unpack_nibbles(packed, 15), codes)


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = {"conv.weight": torch.randn(8, 4, 3, 3, generator=g), "norm.bias": torch.randn(8, generator=g),
               "proj.weight": torch.randn(16, 8, generator=g)}
    student = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in teacher.items()}
    student["cond_proj.weight"] = torch.randn(8, 5, generator=g)  # the student's own layer
    return teacher, student


@pytest.mark.parametrize("bits", [4, 8])
def test_delta_file_rebuilds_the_student(tmp_path, bits):
    teacher, student = _pair()
    path = tmp_path / "delta.safetensors"
    delta.save_delta(path, teacher, student, teacher_hash="abc", bits=bits)
    got = delta.apply_delta(teacher, path, teacher_hash="abc")
    assert set(got) == set(student)
    for name, value in teacher.items():
        d = (student[name] - value).reshape(value.shape[0] if value.ndim > 1 else 1, -1)
        bound = d.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1) / 2 * (1 + 1e-5)
        assert ((got[name] - student[name]).reshape(d.shape).abs() <= bound).all(), name
    assert torch.equal(got["cond_proj.weight"], student["cond_proj.weight"].half().float())
    size = path.stat().st_size
    delta.save_delta(path, teacher, student, teacher_hash="abc", bits=8 if bits == 4 else 4)
    assert (size < path.stat().st_size) == (bits == 4)  # 4 bits take about half the bytes of 8


def test_delta_refuses_other_weights_and_broken_files(tmp_path):
    teacher, student = _pair()
    path = tmp_path / "delta.safetensors"
    delta.save_delta(path, teacher, student, teacher_hash="abc")
    with pytest.raises(CarraraError, match="made from a teacher with weights abc, but this model's are xyz"):
        delta.apply_delta(teacher, path, teacher_hash="xyz")
    with pytest.raises(CarraraError, match="not distilled from this teacher"):
        delta.make_delta({**teacher, "extra.weight": torch.zeros(2, 2)}, student)
    with pytest.raises(CarraraError, match="not distilled from this teacher"):
        delta.make_delta({**teacher, "proj.weight": torch.zeros(4, 8)}, student)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CarraraError, match="not a readable student delta"):
        delta.apply_delta(teacher, cut, teacher_hash="abc")
    tensors = load_file(str(path))
    del tensors["proj.weight.scale"]
    save_file(tensors, str(tmp_path / "short.safetensors"),
              metadata={"bits": "4", "teacher_hash": "abc", "shapes": json.dumps({k: list(v.shape) for k, v in
                                                                                  student.items()})})
    with pytest.raises(CarraraError, match="truncated or mismatched"):
        delta.apply_delta(teacher, tmp_path / "short.safetensors", teacher_hash="abc")


@pytest.fixture(scope="module")
def teacher_and_student(tiny_diffusion_run, tiny_shapes, tmp_path_factory):
    """A copy of the tiny diffusion run (the teacher) and a 6-step distillation of it (the student run)."""
    root = tmp_path_factory.mktemp("student")
    teacher = root / "teacher"
    shutil.copytree(tiny_diffusion_run, teacher, ignore=shutil.ignore_patterns("checkpoints", "samples"))
    recipe = DistillRecipe(teacher=str(teacher), data=str(tiny_shapes), embed_dim=16, sample_prompts=["a red circle"],
                           train=TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1,
                                             checkpoint_every=6, sample_every=1000, bf16=False, ema_decay=0.95))
    train_distill(recipe, root / "lcm", progress=False)
    return teacher, root / "lcm"


def test_export_puts_the_student_beside_its_teacher(teacher_and_student, tmp_path):
    teacher_src, run = teacher_and_student
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_src, teacher)
    r = export_student(run, teacher, prompts=("a red circle", "a blue square"))
    folder = teacher / "student"
    assert r["out"] == str(folder) and r["mean_abs_dpixel_255"] <= 2.0 and r["prompts"] == 2
    assert sorted(p.name for p in folder.iterdir()) == ["model_index.json", "scheduler", "training", "unet"]
    assert (folder / "training" / "log.txt").is_file() and (folder / "unet" / "delta.safetensors").is_file()
    assert not [p for p in teacher.iterdir() if p.name.startswith(".")]  # no temporary folder left
    index = json.loads((folder / "model_index.json").read_text())
    assert index["student"] == json.loads((run / "model_index.json").read_text())["carrara"]["student"]
    assert index["bits"] == 4 and index["check"]["mean_abs_dpixel_255"] == r["mean_abs_dpixel_255"]

    fast = Pipeline.load(teacher, precision="fp32", fast=True)
    own = Pipeline.load(run, precision="fp32")
    assert fast.student == own.student and fast.defaults == own.defaults == {"steps": 4, "sampler": "lcm"}
    assert fast.model_hash == index["weights_hash"] != Pipeline.load(teacher, precision="fp32").model_hash
    prompts = ["a red circle", "a green star", "a blue square"]
    got = fast(prompts, seed=3, output="tensor", **fast.defaults)
    want = own(prompts, seed=3, output="tensor", **own.defaults)
    assert (got - want).abs().mean() * 127.5 <= 2.0 and (got - want).abs().mean() > 0  # rebuilt, not copied
    # the teacher without --fast is the teacher: its own guided sampling
    plain = Pipeline.load(teacher, precision="fp32")
    assert plain.student is None and plain.unet.config.time_cond_proj_dim is None


def test_generate_fast_records_it_and_from_makes_it_again(teacher_and_student, tmp_path, capsys):
    teacher_src, run = teacher_and_student
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_src, teacher)
    export_student(run, teacher, prompts=("a red circle",))
    out = tmp_path / "fast.png"
    assert main(["generate", "a red circle", "--model", str(teacher), "--fast", "-o", str(out), "--quiet",
                 "--precision", "fp32"]) == 0
    meta = read_png_metadata(out)
    assert meta["fast"] is True and meta["student"]["method"] == "lcm" and (meta["steps"], meta["sampler"]) == (4, "lcm")
    again = tmp_path / "again.png"
    assert main(["generate", "--from", str(out), "-o", str(again), "--quiet"]) == 0
    from PIL import Image
    assert Image.open(out).tobytes() == Image.open(again).tobytes()
    assert read_png_metadata(again)["fast"] is True


def test_bad_input_is_one_error_line(teacher_and_student, tmp_path, capsys):
    teacher_src, run = teacher_and_student
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_src, teacher)
    cases = [
        (["generate", "a red circle", "--model", str(teacher), "--fast", "-o", str(tmp_path / "x.png")],
         "has no few-step student"),
        (["export", "student", "--student", str(teacher), "--model", str(teacher)], "is not a distilled student"),
        (["export", "student", "--student", str(run), "--model", str(tmp_path / "absent")], "does not exist"),
    ]
    other = tmp_path / "other"  # a teacher with other weights
    shutil.copytree(teacher_src, other)
    weights = other / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    save_file({k: v + 1e-3 for k, v in state.items()}, str(weights))
    cases.append((["export", "student", "--student", str(run), "--model", str(other)], "a student goes beside its own"))
    for argv, message in cases:
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], (argv, err)
    assert not (teacher / "student").exists() and not (other / "student").exists()
    with pytest.raises(CarraraError, match="more than its 0 MB budget"):
        export_student(run, teacher, max_mb=1e-3, prompts=("a red circle",))
    assert sorted(p.name for p in teacher.iterdir()) == sorted(p.name for p in teacher_src.iterdir())
    export_student(run, teacher, prompts=("a red circle",))
    with pytest.raises(CarraraError, match="no int8 calibration"):
        Pipeline.load(teacher, precision="int8", fast=True)


def test_quantize_fast_calibrates_the_student_for_int8(teacher_and_student, tiny_shapes, tmp_path, capsys):
    """`carrara quantize --fast` writes the student's own calibration into student/unet/ (keyed by the student's
    weights, not the teacher's); then --fast --precision int8 samples the student in int8, near its fp32 images, and
    the teacher's own int8 still asks for its own calibration."""
    from carrara.models import int8

    teacher_src, run = teacher_and_student
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_src, teacher)
    export_student(run, teacher, prompts=("a red circle",))
    with pytest.raises(CarraraError, match=r"--fast has no int8 calibration .*carrara quantize --model .* --fast"):
        Pipeline.load(teacher, precision="int8", fast=True)
    judge = ["eval", "--model", str(teacher), "--data", str(tiny_shapes), "--n", "4", "--metrics", "faithfulness",
             "--fast", "--precision", "int8", "--quiet", "--out", str(tmp_path / "report")]
    assert main(judge) == 2 and "carrara quantize" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    assert main(["quantize", "--model", str(teacher), "--fast", "--prompts", str(tmp_path / "p.txt"), "--n", "2"]) == 0
    assert "quality: mean |Δpixel| int8 vs fp32" in capsys.readouterr().out
    record = json.loads((teacher / "student" / "unet" / int8.CALIBRATION_FILE).read_text())
    fp32 = Pipeline.load(teacher, precision="fp32", fast=True)
    assert record["unet_hash"] == fp32.model_hash and record["settings"]["sampler"] == "lcm"
    assert not (teacher / "unet" / int8.CALIBRATION_FILE).exists()
    quantized = Pipeline.load(teacher, precision="int8", fast=True)
    assert int8.is_int8(quantized.unet) and quantized.student == fp32.student
    a, b = (p(["a red circle", "a green star"], seed=3, output="tensor") for p in (fp32, quantized))
    assert 0 < int8.pixel_diff_255(a, b) <= 4.0  # int8 arithmetic, not the fp32 weights, and close to them
    with pytest.raises(CarraraError, match="no int8 calibration"):
        Pipeline.load(teacher, precision="int8")
    assert main(judge) == 0  # carrara eval --precision int8 judges the int8 student
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["precision"] == "int8" and report["settings"]["precision"] == "int8"
    assert report["model_hash"] == record["unet_hash"]


def test_quantize_fast_on_a_student_run_calibrates_its_own_unet(teacher_and_student, tmp_path):
    """A student run is its own model: --fast changes nothing, and the calibration goes into RUN/unet/."""
    from carrara.models import int8

    run = tmp_path / "run"
    shutil.copytree(teacher_and_student[1], run, ignore=shutil.ignore_patterns("checkpoints", "samples"))
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert main(["quantize", "--model", str(run), "--fast", "--prompts", str(tmp_path / "p.txt"), "--n", "1"]) == 0
    assert (run / "unet" / int8.CALIBRATION_FILE).is_file() and not (run / "student").exists()
    assert int8.is_int8(Pipeline.load(run, precision="int8", fast=True).unet)


def test_serve_loads_every_model_at_the_asked_precision(teacher_and_student, tmp_path, monkeypatch):
    import carrara.serve.app as app_module

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_and_student[0], teacher)
    export_student(teacher_and_student[1], teacher, prompts=("a red circle",))
    served = []
    monkeypatch.setattr(app_module, "server", lambda app: type("S", (), {"run": lambda self, sockets: served.append(
        app)})())
    monkeypatch.setenv("CARRARA_BF16", "1")  # auto would be bf16
    assert main(["serve", "--model", str(teacher), "--port", "0", "--data-dir", str(tmp_path / "g"),
                 "--precision", "fp32"]) == 0
    models = served[0].state.models
    assert models.get().precision == "fp32" and models.get("teacher-fast").precision == "fp32"


def test_serve_offers_the_student_and_previews_with_it(teacher_and_student, tmp_path):
    from fastapi.testclient import TestClient

    from carrara.serve.app import create_app
    from carrara.serve.models import discover

    teacher_src, run = teacher_and_student
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_src, teacher)
    assert [c.name for c in discover(str(teacher))].count("teacher-fast") == 0  # no student yet
    export_student(run, teacher, prompts=("a red circle",))
    choices = {c.name: c for c in discover(str(teacher))}
    assert choices["teacher-fast"].fast and choices["teacher-fast"].ref == choices["teacher"].ref
    app = create_app(Pipeline.load(teacher, precision="fp32"), tmp_path / "gallery", batch_images=4,
                     load=lambda path, **kw: Pipeline.load(path, precision="fp32", **kw))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        teacher_info = client.get("/api/model").json()
        assert teacher_info["draft"] == {"size": 16, "steps": 4, "sampler": "lcm", "model": "teacher-fast"}
        fast_info = client.get("/api/model", params={"name": "teacher-fast"}).json()
        assert fast_info["student"]["method"] == "lcm" and fast_info["defaults"]["sampler"] == "lcm"
        assert "model" not in fast_info["draft"]  # the student previews with itself
        job = client.post("/api/generate", json={"prompt": "a red circle", "model": "teacher-fast", "steps": 4,
                                                 "sampler": "lcm", "seed": 1}).json()
        deadline = time.monotonic() + 120
        while (job := client.get(f"/api/jobs/{job['id']}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job["status"] == "done", job
        png = tmp_path / "served.png"
        png.write_bytes(client.get(job["images"][0]["url"]).content)
    meta = read_png_metadata(png)
    assert meta["fast"] is True and meta["student"]["method"] == "lcm" and meta["model"] == str(teacher.resolve())
    out = tmp_path / "again.png"  # the served PNG is made again by `carrara generate --from`, with the student
    assert main(["generate", "--from", str(png), "-o", str(out), "--quiet", "--precision", "fp32"]) == 0
    assert read_png_metadata(out)["model_hash"] == meta["model_hash"]


def test_delta_bench_measures_the_bit_widths(teacher_and_student, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    import delta as bench_delta

    teacher, run = teacher_and_student
    out = tmp_path / "delta.json"
    assert bench_delta.main(["--teacher", str(teacher), "--student", str(run), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    rows = r["images"]
    assert set(rows) == {"4 bits", "8 bits", "student in fp16"} and r["steps"] == 4
    assert 0 < rows["8 bits"]["mean_abs_dpixel_255"] < rows["4 bits"]["mean_abs_dpixel_255"]
    energy = [r["rank_energy"][str(k)] for k in (8, 16, 32, 64)]
    assert energy == sorted(energy) and 0 < energy[0] and energy[-1] <= 1 + 1e-9
    assert 0 < r["relative_delta"]["median"] <= r["relative_delta"]["max"]
    assert bench_delta.main(["--teacher", str(tmp_path / "absent"), "--student", str(run)]) == 2


def test_rank_energy_is_what_a_rank_r_approximation_keeps():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    import delta as bench_delta

    g = torch.Generator().manual_seed(0)
    teacher = {"w": torch.zeros(100, 90)}
    low = torch.randn(100, 8, generator=g) @ torch.randn(8, 90, generator=g)  # rank 8: all kept from r = 8 on
    assert bench_delta.rank_energy(teacher, {"w": low}) == pytest.approx({8: 1, 16: 1, 32: 1, 64: 1})
    full = torch.randn(100, 90, generator=g)  # white noise: rank r keeps a little more than r/90 of the energy
    kept = bench_delta.rank_energy(teacher, {"w": full})
    assert 8 / 90 < kept[8] < kept[16] < kept[32] < kept[64] < 1


def test_eval_fast_judges_the_student_at_its_own_steps(teacher_and_student, tiny_shapes, tmp_path, capsys):
    teacher_src, run = teacher_and_student
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_src, teacher)
    export_student(run, teacher, prompts=("a red circle",))
    args = ["eval", "--model", str(teacher), "--data", str(tiny_shapes), "--n", "4", "--metrics", "faithfulness",
            "--quiet"]
    assert main([*args, "--fast", "--out", str(tmp_path / "fast")]) == 0
    fast = json.loads((tmp_path / "fast" / "metrics.json").read_text())
    assert fast["settings"]["fast"] and (fast["settings"]["steps"], fast["settings"]["sampler"]) == (4, "lcm")
    assert fast["model_hash"] == json.loads((teacher / "student" / "model_index.json").read_text())["weights_hash"]
    assert main([*args, "--out", str(tmp_path / "teacher-report")]) == 0  # without --fast: the teacher, its own 20
    plain = json.loads((tmp_path / "teacher-report" / "metrics.json").read_text())
    assert (plain["settings"]["steps"], plain["settings"]["sampler"]) == (20, "dpmpp") and not plain["settings"]["fast"]


def test_export_default_keeps_a_student_made_for_the_same_weights(teacher_and_student, tmp_path):
    from carrara.export import export_default

    teacher_src, run = teacher_and_student
    first = export_default(teacher_src, tmp_path / "fp16")  # fp16 weights: another hash than the fp32 teacher's
    assert first["student"] is None and not (tmp_path / "fp16" / "student").exists()
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_src, teacher)
    export_student(run, teacher, prompts=("a red circle",))
    again = export_default(teacher, tmp_path / "fp16")  # the student was made for the fp32 weights: not carried
    assert again["student"] is None and not (tmp_path / "fp16" / "student").exists()
    same = export_default(teacher, tmp_path / "fp32", dtype=torch.float32)  # the same weights: it comes along
    assert same["student"] == str(teacher / "student") and (tmp_path / "fp32" / "student" / "unet").is_dir()
    before = (tmp_path / "fp32" / "student" / "unet" / "delta.safetensors").read_bytes()
    assert export_default(tmp_path / "fp32", tmp_path / "fp32", dtype=torch.float32)["student"]  # re-export in place
    assert (tmp_path / "fp32" / "student" / "unet" / "delta.safetensors").read_bytes() == before
    assert Pipeline.load(tmp_path / "fp32", precision="fp32", fast=True).student["method"] == "lcm"
