"""`carrara generate`: prompt → PNG whose metadata says how to make it again.

Output names (shown by `carrara generate --help`): `-o out.png` (default carrara.png) is the image; with `--n K`
(K > 1) it is the grid, and image i (seed + i) is also saved alone as out-0.png … out-{K−1}.png, each with its
own metadata, so `--from out-2.png` makes image 2 again. Nothing is overwritten: if any of these names exists,
the set is numbered like Automatic1111's outputs, out-00001.png (out-00001-0.png …), with the next free number,
unless `--overwrite`. The folder is checked to be writable before any work, and the set is written all or none.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from carrara.diffusion.editing import check_strength
from carrara.diffusion.guidance import ClassifierGuidance
from carrara.diffusion.settings import DEFAULTS as SETTINGS
from carrara.diffusion.settings import SAMPLER_NAMES, GenerationSettings
from carrara.errors import CarraraError
from carrara.families.pipeline import FamilyPipeline, load_any
from carrara.fileio import check_writable, file_sha256
from carrara.images import image_grid, open_picture
from carrara.modelfolder import packaged
from carrara.models.lora import file_hash
from carrara.pipeline import IMG2IMG_STRENGTH, INPAINT_STRENGTH, MAX_BATCH, load_classifier
from carrara.png import A1111_SAMPLERS, read_png_metadata, save_pngs

DEFAULTS = {**dataclasses.asdict(SETTINGS), "precision": "auto", "n": 1}
# What --from accepts in a PNG's metadata: field → (Python types, how the error names it).
_FROM_FIELDS = {"prompt": (str, "text"), "negative_prompt": (str, "text"), "sampler": (str, "a sampler name"),
                "precision": (str, "a precision name"), "model": (str, "a model path"), "model_hash": (str, "text"),
                "steps": (int, "a whole number"), "seed": (int, "a whole number"), "n": (int, "a whole number"),
                "size": (int, "a whole number"),
                "guidance": ((int, float), "a number")}


def _read_from(path: str) -> dict:
    """The settings of a `--from` PNG, each field checked for its type (a hand-edited PNG gives one clear line)."""
    meta = read_png_metadata(path)
    for key, (kind, name) in _FROM_FIELDS.items():
        if key in meta and (not isinstance(meta[key], kind) or isinstance(meta[key], bool)):
            raise CarraraError(f"{path}: metadata field {key!r} must be {name}, got "
                               f"{json.dumps(meta[key], ensure_ascii=False)[:60]}")
    return meta


def _settings(args: argparse.Namespace, meta: dict | None) -> tuple[dict, str]:
    """Merge --from metadata, then explicit flags, then defaults; returns (settings, model path)."""
    base = dict(DEFAULTS)
    model = "default"
    if meta is not None:
        base.update({k: meta[k] for k in ("prompt", "steps", "sampler", "guidance", "negative_prompt", "seed", "n",
                                          "size") if k in meta})
        base["precision"] = meta.get("precision", "fp32")  # PNGs from before the precision option were fp32
        model = meta.get("model", model)
    flags = {"prompt": args.prompt, "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance,
             "negative_prompt": args.negative, "seed": args.seed, "precision": args.precision, "n": args.n,
             "size": args.size}
    base.update({k: v for k, v in flags.items() if v is not None})
    if base["sampler"] not in SAMPLER_NAMES and args.sampler is None:  # an A1111 PNG's sampler carrara lacks
        raise CarraraError(f"{args.from_png}: sampler {base['sampler']!r} is not one carrara has "
                           f"({', '.join(A1111_SAMPLERS.values())}); give --sampler {'|'.join(SAMPLER_NAMES)}")
    if args.model is not None:
        model = args.model
    if not base.get("prompt", "").strip() and not getattr(args, "classifier", None) and not _unclip_mode(args) and (
            "classifier" not in (meta or {})) and (
            "unclip" not in (meta or {})):  # an unCLIP strip's PNG: _unclip_request says why it is not re-made
        raise CarraraError('give a prompt, e.g. carrara generate "a red circle" (or --from image.png)')
    if not 1 <= base["n"] <= MAX_BATCH:
        raise CarraraError(f"--n must be between 1 and {MAX_BATCH}, got {base['n']}")
    return base, model


def _output_names(base: Path, n: int) -> list[Path]:
    """The files one run writes: the image (or grid), then with n > 1 each image alone as base-i.png."""
    return [base] + ([base.with_name(f"{base.stem}-{i}.png") for i in range(n)] if n > 1 else [])


def _next_free(out: Path, n: int) -> Path:
    """`out` itself if none of its run's files exist, else out-NNNNN.png with 1 + the highest number in use."""
    if not any(p.exists() for p in _output_names(out, n)):
        return out
    pattern = re.compile(re.escape(out.stem) + r"-(\d{5})(-\d+)?\.png")
    used = [int(m.group(1)) for p in out.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    return out.with_name(f"{out.stem}-{max(used, default=0) + 1:05d}.png")


def _check_writable(out: Path) -> None:
    """Fail before generating if `out` cannot be written: its folder must exist and accept a new file."""
    if out.suffix.lower() != ".png":
        raise CarraraError(f"-o {out}: the output must be a .png file (metadata lives in PNG text chunks)")
    if out.is_dir():
        raise CarraraError(f"-o {out} is a folder; give a file name like {out / 'carrara.png'}")
    check_writable(out, "-o")


def _picture_record(path: str, what: str) -> tuple[Image.Image, dict]:
    """A picture file, and how its PNG metadata names it: the resolved path and the first 16 hex of its SHA-256."""
    picture = open_picture(path, what)
    digest = file_sha256(path)[:16]
    return picture, {"file": str(Path(path).resolve()), "sha256": digest}


def _recorded_picture(meta: dict, key: str, what: str, from_png: str) -> str:
    """The path of the --init / --mask picture a --from PNG records, if it is still there unchanged (else a warning)."""
    record = meta[key]
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise CarraraError(f"{from_png}: metadata field {key!r} must name a file, got {json.dumps(record)[:60]}")
    if not Path(record["file"]).is_file():
        raise CarraraError(f"{from_png} was made from the {what} {record['file']}, which is gone: pass --{key} FILE")
    return record["file"]


def _edit_inputs(args: argparse.Namespace, meta: dict | None) -> tuple[dict, dict]:
    """(Pipeline keyword arguments, metadata) for img2img / inpainting: --init, --mask, --strength, or a --from PNG's."""
    meta = meta or {}
    init = args.init or (_recorded_picture(meta, "init", "init image", args.from_png) if "init" in meta else None)
    mask = args.mask or (_recorded_picture(meta, "mask", "mask", args.from_png) if "mask" in meta and not args.init
                         else None)
    strength = args.strength if args.strength is not None else (meta.get("strength") if init else None)
    if init is None:
        for flag, given in (("--mask", args.mask), ("--strength", args.strength)):
            if given is not None:
                raise CarraraError(f"{flag} edits an image: give it with --init IMAGE")
        return {}, {}
    if strength is not None:
        check_strength(strength)
    kwargs, record = {"strength": strength}, {}
    kwargs["init_image"], record["init"] = _picture_record(init, "--init")
    if mask is not None:
        kwargs["mask"], record["mask"] = _picture_record(mask, "--mask")
    for key in ("init", "mask"):
        if key in meta and key in record and meta[key].get("sha256") != record[key]["sha256"]:
            print(f"carrara: warning: {record[key]['file']} has changed since {args.from_png} was made from it",
                  file=sys.stderr)
    record["strength"] = strength if strength is not None else (INPAINT_STRENGTH if mask else IMG2IMG_STRENGTH)
    return kwargs, record


def _lora_specs(args: argparse.Namespace, meta: dict | None) -> list[str]:
    """The --lora flags, or else the adapters a --from PNG records (a gone file is one line, a changed one a warning)."""
    if args.lora or not meta or "lora" not in meta:
        return args.lora or []
    records = meta["lora"]
    if not isinstance(records, list) or not all(
            isinstance(r, dict) and isinstance(r.get("file"), str) and isinstance(r.get("weight"), int | float)
            and not isinstance(r.get("weight"), bool) for r in records):
        raise CarraraError(f"{args.from_png}: metadata field 'lora' must list {{file, sha256, weight}} records")
    for r in records:
        if not Path(r["file"]).is_file():
            raise CarraraError(f"{args.from_png} was made with the LoRA {r['file']}, which is gone: pass --lora FILE")
        if file_hash(Path(r["file"])) != r.get("sha256"):
            print(f"carrara: warning: the LoRA {r['file']} has changed since {args.from_png} was made with it",
                  file=sys.stderr)
    return [f"{r['file']}:{r['weight']}" for r in records]


def generate_command(args: argparse.Namespace) -> int:
    meta = _read_from(args.from_png) if args.from_png else None
    s, model = _settings(args, meta)
    GenerationSettings(s["prompt"], s["negative_prompt"], s["steps"], s["sampler"], s["guidance"], s["seed"]).validate()
    edit_kwargs, edit_record = _edit_inputs(args, meta)
    request = _unclip_request(args, s, meta)  # --variations / --interpolate / --text-diff: pictures read now
    asked = Path(args.out or "carrara.png")
    _check_writable(asked)
    out = asked if args.overwrite else _next_free(asked, s["n"])
    t0 = time.perf_counter()
    fast = args.fast or (meta or {}).get("fast") is True  # the model's few-step student (carrara/student.py)
    lora_specs = _lora_specs(args, meta)  # LoRA merges into fp32 weights: then "auto" is not int8
    pipe = load_any(model, allow_pickle=args.allow_pickle, precision=s["precision"],  # a diffusion or family model
                    **({"fast": True} if fast else {}), **({"auto_int8": False} if lora_specs else {}))
    if lora_specs and isinstance(pipe, FamilyPipeline):
        raise CarraraError(f"--lora adapts a diffusion model's U-Net; {model} is a {pipe.kind} model")
    loras = pipe.merge_loras(lora_specs) if lora_specs else []  # merged into the weights (models/lora.py)
    if edit_kwargs and isinstance(pipe, FamilyPipeline):
        raise CarraraError(f"--init edits with a diffusion model; {model} is a {pipe.kind} model")
    guide_kwargs, guide_record = _classifier_guidance(args, pipe, s.get("prompt") or "", meta)
    unclip_kwargs, unclip_record, per_image = _unclip_inputs(args, request, pipe, s, model, meta)
    student = None if isinstance(pipe, FamilyPipeline) else pipe.student
    for key, value in ({} if student is None else pipe.defaults).items():  # a student's own sampler and steps
        if getattr(args, key) is None and key not in (meta or {}):
            s[key] = value
    t1 = time.perf_counter()
    bars = []  # opened at the first step, so settings the model refuses end in one line, not a bar and a line

    def progress(i, n, _decode):
        if not bars:
            bars.append(tqdm(total=n, desc="denoising", unit="step", file=sys.stderr, disable=args.quiet))
        bars[0].update(i - bars[0].n)  # called before step i: i steps are done

    try:
        images = pipe([s["prompt"]] * s["n"], steps=s["steps"], sampler=s["sampler"], guidance=s["guidance"],
                      negative_prompt=s["negative_prompt"], seed=s["seed"], callback=progress, size=s.get("size"),
                      **edit_kwargs, **guide_kwargs, **unclip_kwargs)
        if bars:
            bars[0].update(bars[0].total - bars[0].n)
    finally:
        if bars:
            bars[0].close()
    t2 = time.perf_counter()
    recorded = (meta or {}).get("model_hash")
    if recorded and recorded != pipe.model_hash:
        print(f"carrara: warning: {args.from_png} was made by model {recorded}, this is {pipe.model_hash}",
              file=sys.stderr)
    model_ref = model if packaged(model) else str(Path(model).resolve())
    metadata = {**s, "precision": pipe.precision, "model": model_ref, "model_hash": pipe.model_hash,
                "size": images[0].width, **edit_record, **guide_record, **unclip_record}
    if student:  # a distilled student (guidance built in): say so, with how it was made
        metadata["student"] = student
    if fast:  # the student beside its teacher: --from loads it again
        metadata["fast"] = True
    if loras:  # each adapter's file, hash and weight
        metadata["lora"] = loras
    if isinstance(pipe, FamilyPipeline):  # not diffusion: steps, sampler, size do not apply; say what made it
        metadata["family"] = pipe.kind
    elif images[0].width != pipe.sizes[0]:  # made by the cascade: its second stage's settings and weights
        metadata["upsampler"] = dataclasses.asdict(pipe.upsampler.settings)
        metadata["upsampler_hash"] = pipe.upsampler.weights_hash
        was = (meta or {}).get("upsampler_hash")
        if isinstance(was, str) and was != pipe.upsampler.weights_hash:
            print(f"carrara: warning: {args.from_png} was upsampled by stage {was}, this is "
                  f"{pipe.upsampler.weights_hash}", file=sys.stderr)
    names = _output_names(out, len(images))
    strip = unclip_kwargs.get("same_noise", False)  # an interpolation or text-diff strip: one row
    files = [(names[0], images[0] if len(images) == 1 else image_grid(images, rows=1 if strip else None), metadata)]
    files += [(name, image, {**metadata, "seed": s["seed"] + i, "n": 1, **per_image[i]})
              for i, (name, image) in enumerate(zip(names[1:], images))]
    try:
        save_pngs(files)
    except OSError as e:
        raise CarraraError(f"cannot write {out}: {e.strerror or e}") from None
    if out != asked:
        print(f"carrara: {asked} exists: wrote {out} instead (--overwrite replaces it)", file=sys.stderr)
    each = f" and each image as {names[1].name} … {names[-1].name}" if len(names) > 1 else ""
    print(f"wrote {out}{each} ({len(images)} image{'s' if len(images) > 1 else ''}, load {t1 - t0:.2f} s, "
          f"generate {t2 - t1:.2f} s)")
    return 0


def _unclip_mode(args: argparse.Namespace) -> str | None:
    """Which DALL-E 2 §3 manipulation the flags ask for (carrara/unclip.py), or None."""
    if args.interpolate:
        if args.variations or args.text_diff is not None:
            raise CarraraError("--interpolate A B stands alone: drop --variations and --text-diff")
        return "interpolate"
    if args.text_diff is not None:
        if not args.variations:
            raise CarraraError("--text-diff moves a picture's embedding: give the picture with --variations IMAGE")
        return "text_diff"
    if args.amount is not None:
        raise CarraraError("--amount is how far --text-diff moves: give it with --text-diff CAPTION")
    return "variations" if args.variations else None


def _unclip_request(args: argparse.Namespace, s: dict, meta: dict | None) -> tuple[str, list, dict] | None:
    """(mode, pictures, record) of an unCLIP manipulation, its pictures read (and refused) before the model loads.

    --text-diff: the positional prompt is the picture's old caption t0 (default ""); the decoder's text is empty."""
    mode = _unclip_mode(args)
    if mode is None:
        if meta and "unclip" in meta:
            raise CarraraError(f"{args.from_png} is an unCLIP {meta['unclip'].get('mode', 'manipulation')} strip: "
                               "--from does not re-make those; run --variations / --interpolate / --text-diff again")
        return None
    if args.prior_guidance is not None:
        raise CarraraError(f"--prior-guidance steers the prior, which --{mode.replace('_', '-')} does not use (it "
                           "embeds the pictures): drop --prior-guidance")
    if mode == "interpolate" and args.n is None:
        s["n"] = 5
    if mode == "interpolate" and s["n"] < 2:
        raise CarraraError("--interpolate draws a strip from A to B: give --n 2 or more")
    flag = "--interpolate" if mode == "interpolate" else "--variations"
    read = [_picture_record(p, flag) for p in (args.interpolate if mode == "interpolate" else [args.variations])]
    record = {"mode": mode, "images": [r for _, r in read]}
    if mode == "text_diff":
        amount = 0.5 if args.amount is None else args.amount
        if not args.text_diff.strip():
            raise CarraraError("--text-diff needs the new caption, e.g. --text-diff \"a cat wearing a hat\"")
        if not 0.0 <= amount <= 1.0:
            raise CarraraError(f"--amount must be between 0 and 1 (θ of the slerp), got {amount}")
        record.update(new_caption=args.text_diff, old_caption=s["prompt"], amount=amount)
        s["prompt"] = ""
    return mode, [picture for picture, _ in read], record


def _unclip_inputs(args: argparse.Namespace, request, pipe, s: dict, model: str,
                   meta: dict | None) -> tuple[dict, dict, list[dict]]:
    """(Pipeline keyword arguments, metadata, each image's metadata) of the unCLIP route: the prior's guidance, or
    the image embeddings of a manipulation (variations from new noise; strips from the noise of one seed)."""
    unclip = getattr(pipe, "unclip", None)
    if request is None:
        if unclip is None:
            if args.prior_guidance is not None:
                raise CarraraError(f"--prior-guidance steers an unCLIP model's prior; {model} is not an unCLIP model")
            return {}, {}, [{}] * s["n"]
        recorded = (meta or {}).get("prior", {})
        w = args.prior_guidance if args.prior_guidance is not None else (
            recorded.get("guidance") if isinstance(recorded, dict) else None)
        return ({"prior_guidance": w}, {"prior": {**unclip.prior_settings, **({} if w is None else {"guidance": w})}},
                [{}] * s["n"])
    mode, pictures, record = request
    if unclip is None:
        raise CarraraError(f"--{mode.replace('_', '-')} needs an unCLIP model (carrara train decoder, carrara export "
                           f"unclip); {model} is not one")
    kwargs, per_image = unclip.manipulation_inputs(mode, pictures, s["n"], record, s["seed"])
    return kwargs, {"unclip": record}, per_image


def _classifier_guidance(args: argparse.Namespace, pipe, prompt: str, meta: dict | None) -> tuple[dict, dict]:
    """(Pipeline keyword arguments, metadata) for classifier guidance: --classifier RUN [--classes …]
    --classifier-scale; without --classes, toward what the prompt names (`NoiseAwareClassifier.prompt_classes`);
    with --from, what the PNG records unless a flag says otherwise."""
    record = _recorded_classifier(args, meta)
    run = args.classifier or (record or {}).get("run")
    if run is None:
        for flag, given in (("--classes", args.classes), ("--classifier-scale", args.classifier_scale)):
            if given is not None:
                raise CarraraError(f"{flag} steers a classifier's guidance: give it with --classifier RUN")
        return {}, {}
    if isinstance(pipe, FamilyPipeline):
        raise CarraraError(f"--classifier guides a diffusion model; this is a {pipe.kind} model")
    classifier = load_classifier(run, pipe.schedule)
    classes = args.classes
    if classes is None and record is not None and record.get("classes_from") != "prompt":
        classes = record["classes"]
    if classes is None:
        if not prompt.strip():
            raise CarraraError('--classifier with an empty prompt (the unconditional model) needs --classes, e.g. '
                               '--classes "shape=star,color=red"')
        wanted = classifier.prompt_classes(prompt)
    else:
        wanted = classifier.parse_classes(classes)
    scale = args.classifier_scale if args.classifier_scale is not None else (record or {}).get("scale", 1.0)
    guide = ClassifierGuidance(lambda x, t: classifier.log_prob(x, t, wanted), scale)
    return {"classifier": guide}, {"classifier": {"run": str(Path(run).resolve()), "classes": classifier.describe(wanted),
                                                  "scale": scale, **({} if classes else {"classes_from": "prompt"})}}


def _recorded_classifier(args: argparse.Namespace, meta: dict | None) -> dict | None:
    """The classifier guidance a --from PNG records (unless --classifier names another), checked: one line if it is
    malformed or its run is gone."""
    record = (meta or {}).get("classifier") if args.classifier is None else None
    if record is None:
        return None
    scale = record.get("scale") if isinstance(record, dict) else None
    if not (isinstance(record, dict) and isinstance(record.get("run"), str) and isinstance(record.get("classes"), str)
            and isinstance(scale, int | float) and not isinstance(scale, bool) and scale >= 0):
        raise CarraraError(f"{args.from_png}: metadata field 'classifier' must be {{run, classes, scale}}")
    if not Path(record["run"]).exists():
        raise CarraraError(f"{args.from_png} was made with the classifier {record['run']}, which is gone: pass "
                           "--classifier RUN")
    return record
