"""`carrara export default|diffusers|cascade|student`: package a trained diffusion run.

`default`: the packaged folder (carrara/assets/default, written by `--into-package`) is an ordinary model folder with fp16 weights (half the bytes;
they are cast back to float32 on load) and, under training/, the run's recipe, log, metrics and loss curves,
so the shipped weights say how they were made.

`cascade`: a base model folder with an upsampler run beside it (carrara/upsampler.py `assemble_cascade`).

`student`: a `carrara distill` run put beside its teacher as MODEL/student/, its weights a 4-bit difference from the
teacher's (carrara/student.py, models/delta.py), checked by sampling both before it replaces anything.

`diffusers`: a self-contained Stable Diffusion folder that `diffusers.StableDiffusionPipeline.from_pretrained(DIR)`
loads offline: carrara's run folder already has diffusers' unet/, vae/ and scheduler/; the export adds the text
encoder (the MiniLM BertModel, with `use_attention_mask` so diffusers passes the mask as carrara does) and its
tokenizer (`model_max_length` = carrara's 64 tokens, so both pad prompts to the same length).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from carrara.diffusion.consistency import STUDENT_STEPS
from carrara.errors import CarraraError
from carrara.fileio import file_sha256, temp_dir_beside, write_json_atomic
from carrara.modelfolder import read_json_object, resolve, weights_hash
from carrara.models.codec import PixelCodecConfig, codec_config
from carrara.models.config import CONFIG_NAME
from carrara.models.delta import BITS, DELTA_NAME, save_delta
from carrara.models.unet import UNet2DConditionModel as UNet
from carrara.models.weights import load_weights, save_folder
from carrara.pipeline import Pipeline
from carrara.student import FOLDER as STUDENT_FOLDER
from carrara.student import rebuild_unet, student_record
from carrara.text.encoder import TextEncoder, resolve_folders
from carrara.upsampler import TRAINING_FILES, training_records

MAX_MEAN_DPIXEL = 2.0  # /255: a shipped student's images against its run's (the int8 U-Net's tolerance, models/int8.py)
CHECK_PROMPTS = ("a cat face", "a slice of pizza", "a red heart", "a rocket", "a snowman", "a penguin", "a rainbow",
                 "a birthday cake")


def _copy_component(src: Path, dst: Path, dtype: torch.dtype) -> None:

    state = load_weights(src)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_folder(dst, json.loads((src / CONFIG_NAME).read_text()), state)


def export_default(model: str | Path, out: str | Path, *, autoencoder_run: str | Path | None = None,
                   upsampler_run: str | Path | None = None, dtype: torch.dtype = torch.float16,
                   max_mb: float = 100.0) -> dict:
    """Write model folder `model` (a diffusion run, or a cascade with upsampler/) as fp16 to `out`; the package's
    own default model is `PACKAGED / "default"`, replaced only when a caller names it (the CLI's --into-package)."""
    folder = resolve(model)
    out = Path(out)
    if out.exists() and not (out / "model_index.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise CarraraError(f"--out {out} exists and is not a model folder; pick a new folder (only an earlier "
                           "export is replaced)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out.parent, ".export-")
    try:
        _copy_component(folder.unet, tmp / "unet", dtype)
        if isinstance(codec_config(folder.vae), PixelCodecConfig):  # the pixel codec: a config.json, no weights
            shutil.copytree(folder.vae, tmp / "vae")
        else:
            _copy_component(folder.vae, tmp / "vae", dtype)
        shutil.copytree(folder.root / "scheduler", tmp / "scheduler")
        shutil.copy2(folder.root / "model_index.json", tmp / "model_index.json")
        upsampler = folder.root / "upsampler"
        if (upsampler / "model_index.json").is_file():  # a cascade: its second stage, fp16 too
            _copy_component(upsampler / "unet", tmp / "upsampler" / "unet", dtype)
            shutil.copytree(upsampler / "scheduler", tmp / "upsampler" / "scheduler")
            shutil.copy2(upsampler / "model_index.json", tmp / "upsampler" / "model_index.json")
        runs = training_records(folder.root)
        for stage in ("diffusion", "diffusion-init", "upsampler"):  # an assembled cascade carries its stages' records
            if (folder.root / "training" / stage / "log.txt").is_file():
                runs[stage] = folder.root / "training" / stage
        if autoencoder_run:
            runs["autoencoder"] = Path(autoencoder_run)
        if upsampler_run:
            runs["upsampler"] = Path(upsampler_run)
        for stage, run in runs.items():
            _copy_files(run, tmp / "training" / stage, TRAINING_FILES)
        student = _keep_student(tmp, [folder.root, out])
        size_mb = sum(f.stat().st_size for f in tmp.rglob("*.safetensors")) / 1e6
        if size_mb > max_mb:
            raise CarraraError(f"the exported weights take {size_mb:.1f} MB, more than the {max_mb:.0f} MB budget")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "weights_mb": round(size_mb, 2), "student": student}


def _keep_student(tmp: Path, sources: list[Path]) -> str | None:
    """Copy a student/ (carrara/student.py) from the first of `sources` whose student was distilled from exactly the
    U-Net weights just written to `tmp`, so re-exporting a model keeps its student; returns where it came from."""
    new_hash = weights_hash(tmp / "unet")
    for root in sources:
        folder = root / STUDENT_FOLDER
        if (folder / "model_index.json").is_file() and \
                read_json_object(folder / "model_index.json").get("student", {}).get("teacher_hash") == new_hash:
            shutil.copytree(folder, tmp / STUDENT_FOLDER)
            return str(folder)
    return None


def _copy_files(src: Path, dst: Path, names) -> None:
    """Copy those of `names` that exist in `src` into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def export_diffusers(model: str | Path, out: str | Path) -> dict:
    """Write model folder `model` as a diffusers StableDiffusionPipeline folder at `out` (text encoder included)."""

    folder = resolve(model)
    if isinstance(codec_config(folder.vae), PixelCodecConfig):
        raise CarraraError(f"{model} generates in pixel space (vae/ is the pixel codec); diffusers' "
                           "StableDiffusionPipeline needs a KL autoencoder, so it cannot be exported to it")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CarraraError(f"--out {out} exists and is not empty; pick a new folder")
    encoder = TextEncoder.load(folder.text_encoder, tokenizer_path=folder.tokenizer)
    text_dir, _ = resolve_folders(folder.text_encoder, folder.tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out.parent, ".export-")
    try:
        for part in ("unet", "vae", "scheduler"):
            shutil.copytree(folder.root / part, tmp / part)
        scheduler = {"clip_sample": False, **folder.scheduler_config}  # carrara never clips x̂0; diffusers' default does
        write_json_atomic(tmp / "scheduler" / "scheduler_config.json", scheduler)
        _copy_files(text_dir, tmp / "text_encoder", ["config.json", "model.safetensors"])
        config = json.loads((tmp / "text_encoder" / "config.json").read_text())
        config["use_attention_mask"] = encoder.use_attention_mask
        write_json_atomic(tmp / "text_encoder" / "config.json", config)
        encoder.tokenizer.model_max_length = encoder.max_length
        encoder.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        classes = {"BertModel": "BertModel", "CLIPTextModel": "CLIPTextModel", "T5EncoderModel": "T5EncoderModel"}
        text_class = classes.get((config.get("architectures") or ["BertModel"])[0], "BertModel")
        write_json_atomic(tmp / "model_index.json", {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", folder.scheduler_config.get("_class_name", "DDIMScheduler")],
            "text_encoder": ["transformers", text_class],
            "tokenizer": ["transformers", getattr(encoder.tokenizer, "transformers_class", type(encoder.tokenizer).__name__)],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
        })
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out)}


def export_student(student_run: str | Path, model: str | Path, *, bits: int = BITS, max_mb: float | None = None,
                   prompts=CHECK_PROMPTS) -> dict:
    """Put `carrara distill` run `student_run` into model folder `model` (its teacher) as MODEL/student/, replacing
    an earlier one only when every check has passed. Returns what was written and measured."""
    run, target = resolve(student_run), resolve(model)
    record = student_record(run.root)
    if record is None:
        raise CarraraError(f"{student_run} is not a distilled student (no student record in its model_index.json): "
                           "make one with carrara distill")
    teacher_hash = target.unet_hash()
    if record.get("teacher_hash") != teacher_hash:
        raise CarraraError(f"{student_run} was distilled from weights {record.get('teacher_hash')}, but {model}'s "
                           f"U-Net is {teacher_hash}: a student goes beside its own teacher")
    tmp = temp_dir_beside(target.root, ".student-")
    try:
        teacher = UNet.from_pretrained(target.unet)
        pipe = Pipeline.load(run.root, precision="fp32")  # the run's student, as it samples
        pipe.compiled = None  # eager both times: the rebuilt U-Net is swapped in below
        (tmp / "unet").mkdir()
        shutil.copy2(run.unet / CONFIG_NAME, tmp / "unet" / CONFIG_NAME)
        save_delta(tmp / "unet" / DELTA_NAME, teacher.state_dict(), pipe.unet.state_dict(), teacher_hash=teacher_hash,
                   bits=bits)
        shutil.copytree(run.root / "scheduler", tmp / "scheduler")
        (tmp / "training").mkdir()
        for name in TRAINING_FILES:
            if (run.root / name).is_file():
                shutil.copy2(run.root / name, tmp / "training" / name)
        # 1. the rebuilt student against the run's own: same prompts, seeds and settings, fp32, the base's side
        index = {"student": record, "bits": bits, "weights_hash": file_sha256(tmp / "unet" / DELTA_NAME)[:12]}
        write_json_atomic(tmp / "model_index.json", index)
        want = pipe(list(prompts), seed=0, output="tensor", steps=STUDENT_STEPS, sampler="lcm")
        pipe.unet = rebuild_unet(tmp, teacher, teacher_hash)
        got = pipe(list(prompts), seed=0, output="tensor", steps=STUDENT_STEPS, sampler="lcm")
        diff = (got - want).abs() * 127.5
        dpixel = float(diff.mean())
        if not dpixel <= MAX_MEAN_DPIXEL:
            raise CarraraError(f"the {bits}-bit student's images differ from the run's by {dpixel:.2f}/255 on average "
                               f"(at most {MAX_MEAN_DPIXEL}): use more --bits")
        index["check"] = {"mean_abs_dpixel_255": round(dpixel, 4), "max_abs_dpixel_255": round(float(diff.max()), 3),
                          "prompts": len(prompts), "steps": STUDENT_STEPS, "seed": 0}
        write_json_atomic(tmp / "model_index.json", index)
        # 2. the package's budget counts every weights file the model folder will hold
        out = target.root / STUDENT_FOLDER
        others = [f for f in target.root.rglob("*.safetensors") if out not in f.parents and tmp not in f.parents]
        size_mb = sum(f.stat().st_size for f in [*others, *tmp.rglob("*.safetensors")]) / 1e6
        if max_mb is not None and size_mb > max_mb:
            raise CarraraError(f"with the student the model's weights take {size_mb:.1f} MB, more than its "
                               f"{max_mb:.0f} MB budget: use fewer --bits")
        old = target.root / f".{STUDENT_FOLDER}.old"
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    delta_mb = (out / "unet" / DELTA_NAME).stat().st_size / 1e6
    return {"out": str(out), "delta_mb": round(delta_mb, 2), "model_mb": round(size_mb, 2), **index["check"]}
