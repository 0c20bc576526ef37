"""The handlers of the `carrara` subcommands (cli.py builds the parser): each imports its module lazily, so
`carrara --help` and a usage error stay instant. Each takes the parsed arguments and returns the exit code."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

from carrara.errors import CarraraError
from carrara.fileio import check_writable, no_empty_folder_left

SHEET_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # the formats fileio.save_image_atomic writes


def cmd_data_build(args: argparse.Namespace) -> int:
    if args.dataset == "shapes":
        from carrara.data.shapes import build_shapes

        if args.categories or args.emoji_test:
            raise CarraraError("--categories and --emoji-test apply to emoji: shapes captions already describe each "
                               "image fully")
        fraction = 0.5 if args.two_object_fraction is None else args.two_object_fraction
        stats = build_shapes(args.out, n=args.n or 2000, size=args.size, seed=args.seed, overwrite=args.overwrite,
                             two_object_fraction=fraction)
    elif args.dataset == "emoji":
        from carrara.data.emoji import build_emoji

        if args.n is not None:
            raise CarraraError("--n does not apply to emoji: every fully-qualified emoji is rendered")
        if args.two_object_fraction is not None:
            raise CarraraError("--two-object-fraction applies to shapes: emoji images have one emoji each")
        stats = build_emoji(args.out, size=args.size, font=args.font, overwrite=args.overwrite,
                            categories=args.categories or False, emoji_test=args.emoji_test)
    else:  # argparse's choices make this unreachable
        raise CarraraError(f"unknown dataset {args.dataset!r}")
    print(f"wrote {stats['written']} images to {args.out}" + (f" (skipped {stats['skipped']})" if stats.get("skipped") else ""))
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from carrara.data.load import load_dataset

    ds = load_dataset(args.path)
    print(f"{args.path}: {len(ds)} images")
    for reason, count in sorted(ds.skipped.items()):
        print(f"  skipped {count}: {reason}")
    for mode, count in sorted(ds.converted.items()):
        print(f"  converted {count} from {mode} to RGB")
    for i in range(min(args.show, len(ds))):
        print(f"  {ds.records[i].file_name}: {ds.records[i].text}")
    return 0


def cmd_data_shard(args: argparse.Namespace) -> int:
    from carrara.data.shards import write_shards

    stats = write_shards(args.folder, args.out, per_shard=args.size, progress=not args.quiet)
    skipped = sum(stats["skipped"].values())
    print(f"wrote {stats['samples']} samples in {stats['shards']} shards: --data '{stats['pattern']}'"
          + (f" (skipped {skipped} unusable)" if skipped else ""))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from carrara.data.folder import describe
    from carrara.recipe import apply_overrides
    from carrara.train import distributed

    size = {"size": args.size} if args.size else {}  # else the stage's own default (64; upsampler 128)
    if (args.from_model and args.stage not in ("diffusion", "decoder")) or (args.lora_rank and args.stage != "diffusion"):
        raise CarraraError(f"--from and --lora-rank fine-tune a diffusion model: not for train {args.stage}")
    if args.stage == "autoencoder":
        from carrara.train.autoencoder import AutoencoderRecipe, train_autoencoder

        recipe = AutoencoderRecipe(data=args.data, **size)
        run = train_autoencoder
    elif args.stage == "clip":
        from carrara.train.clip import ClipRecipe, train_clip

        recipe = ClipRecipe(data=args.data, **size)
        run = train_clip
    elif args.stage == "prior":
        from carrara.train.prior import PriorRecipe, train_prior

        if not args.clip:
            raise CarraraError("train prior needs --clip CLIP_RUN (a finished `carrara train clip` run)")
        recipe = PriorRecipe(data=args.data, clip=args.clip)
        run = train_prior
    elif args.stage == "decoder":
        from carrara.train.decoder import DecoderRecipe, train_decoder

        if not args.clip:
            raise CarraraError("train decoder needs --clip CLIP_RUN (a finished `carrara train clip` run)")
        recipe = DecoderRecipe(data=args.data, clip=args.clip, **({"from_model": args.from_model} if args.from_model
                                                                  else {}))
        run = functools.partial(train_decoder, allow_pickle=args.allow_pickle)
    elif args.stage == "family":
        from carrara.families.train import FamilyRecipe, train_family

        recipe = FamilyRecipe(kind=args.kind, data=args.data, vqvae=args.vqvae or "", **size)
        run = train_family
    elif args.stage == "classifier":
        from carrara.train.classifier import ClassifierRecipe, train_classifier

        if not args.autoencoder:
            raise CarraraError("train classifier needs --autoencoder RUN: the autoencoder whose latents it classifies")
        recipe = ClassifierRecipe(data=args.data, autoencoder=args.autoencoder, **size)
        run = train_classifier
    elif args.stage == "upsampler":
        from carrara.train.upsampler import UpsamplerRecipe, train_upsampler

        recipe = UpsamplerRecipe(data=args.data, **size)
        run = train_upsampler
    else:
        from carrara.train.diffusion import DiffusionRecipe, fine_tune_recipe, train_diffusion

        if args.from_model and args.autoencoder:
            raise CarraraError("--from fine-tunes a model with its own autoencoder: drop --autoencoder")
        if args.lora_rank and not args.from_model:
            raise CarraraError("--lora-rank needs --from MODEL, the model whose U-Net the adapter adapts")
        if args.from_model:
            recipe = fine_tune_recipe(args.data, args.from_model, lora_rank=args.lora_rank or 0, size=args.size)
        elif not args.autoencoder:
            raise CarraraError("train diffusion needs --autoencoder RUN (a finished `carrara train autoencoder` run) "
                               "or --autoencoder pixels (pixel space), or --from MODEL to fine-tune a model")
        else:
            recipe = DiffusionRecipe(data=args.data, autoencoder=args.autoencoder, **size)
        run = functools.partial(train_diffusion, allow_pickle=args.allow_pickle)
    if args.steps is not None:
        recipe.train.steps = args.steps
    if args.batch_size is not None:
        recipe.train.batch_size = args.batch_size
    apply_overrides(recipe, args.set or [])
    _check_resume(args.out, args.resume)
    try:
        with no_empty_folder_left(args.out):
            result = run(recipe, args.out, resume=args.resume, progress=not args.quiet)
    except BaseException:
        distributed.shutdown(wait=False)
        raise
    distributed.shutdown()
    if not distributed.is_main_process():
        return 0
    print(f"{args.stage} run in {args.out}: {result['steps']} steps, last loss {result['last_loss']:.4f}")
    if describe(result):
        print(f"data: {describe(result)} (listed in {Path(args.out) / 'log.txt'})")
    if "lora" in result:
        print(f"LoRA adapter {result['lora']}: carrara generate \"…\" --model {args.from_model} --lora {result['lora']}")
    if "check" in result:
        c = result["check"]
        print(f"held-out captions ({c['n']}): sampled image embeddings have cosine {c['cos_true']:.3f} to their "
              f"caption's image vs {c['cos_random']:.3f} to a random image (the text embedding itself: "
              f"{c['cos_text_true']:.3f} vs {c['cos_text_random']:.3f}); retrieval top-1 {c['top1']:.1%} top-5 "
              f"{c['top5']:.1%} (chance {c['top5_chance']:.1%})")
    if "variations" in result:
        v = result["variations"]
        print(f"{v['n']} variations of data images: CLIP cosine {v['cos_own']:.3f} to their image vs "
              f"{v['cos_random']:.3f} to a random data image")
    for t, acc in result.get("accuracy", {}).items():
        print(f"held-out accuracy at t={t} ({result['holdout']} images): "
              + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    if "held_out" in result:
        h = result["held_out"]
        print(f"held-out retrieval ({h['n_pairs']} pairs, {h['n_captions']} captions): image→text top-1 "
              f"{h['i2t_top1']:.1%} top-5 {h['i2t_top5']:.1%}, text→image top-1 {h['t2i_top1']:.1%} "
              f"top-5 {h['t2i_top5']:.1%}; CLIP score {h['clip_score_matched']:.1f} (shuffled pairs "
              f"{h['clip_score_shuffled']:.1f})")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from carrara.recipe import apply_overrides, flatten, load_recipe_file
    from carrara.train.distill import DistillRecipe, train_distill

    recipe = DistillRecipe()
    if args.recipe:
        apply_overrides(recipe, flatten(load_recipe_file(args.recipe)))
    for key, value in (("teacher", args.teacher), ("data", args.data)):
        if value is not None:
            setattr(recipe, key, value)
    if args.steps is not None:
        recipe.train.steps = args.steps
    apply_overrides(recipe, args.set or [])
    _check_resume(args.out, args.resume)
    with no_empty_folder_left(args.out):
        result = train_distill(recipe, args.out, resume=args.resume, progress=not args.quiet,
                               allow_pickle=args.allow_pickle)
    print(f"distilled {result['teacher']} into {args.out}: {result['steps']} steps, last loss "
          f"{result['last_loss']:.5f} (try: carrara generate \"a red circle\" --model {args.out} --steps 4)")
    return 0


def _check_resume(out: str, resume: bool) -> None:
    """--resume needs a run to continue: refused before any data is read or any file is written in --out."""
    from carrara.train.checkpoint import latest_checkpoint

    if resume and latest_checkpoint(Path(out)) is None:
        raise CarraraError(f"--resume: no complete checkpoint in {Path(out) / 'checkpoints'} to continue from; "
                           "drop --resume to start a new run")


def cmd_recipe(args: argparse.Namespace) -> int:
    from carrara.recipe import run_recipe

    run_recipe(args.recipe, args.out, resume=args.resume, overrides=args.set or [], progress=not args.quiet)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from carrara.diffusion.settings import DEFAULTS
    from carrara.evaluate.suite import EvalSettings, format_metrics, run_eval

    if not args.model or not args.out:
        raise CarraraError("carrara eval needs --model RUN and --out REPORT_DIR (see carrara eval --help)")
    settings = EvalSettings(model=args.model, data=args.data, n=args.n, clip=args.clip, prompts=args.prompts,
                            metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
                            inception_weights=args.inception_weights, steps=args.steps,
                            guidance=DEFAULTS.guidance if args.guidance is None else args.guidance,
                            sampler=args.sampler, seed=args.seed, bootstrap=args.bootstrap,
                            allow_pickle=args.allow_pickle, fast=args.fast, precision=args.precision)
    with no_empty_folder_left(args.out):  # a refused model or setting leaves no empty report folder
        report = run_eval(settings, args.out, progress=not args.quiet)
    print(format_metrics(report))
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'report.html'}")
    return 0


def cmd_eval_memorisation(args: argparse.Namespace) -> int:
    from carrara.evaluate.memorisation import MemorisationSettings, format_report, run_memorisation

    settings = MemorisationSettings(model=args.model, data=args.data, clip=args.clip, n=args.n, seed=args.seed,
                                    quantile=args.quantile, steps=args.steps, sampler=args.sampler,
                                    guidance=args.guidance, allow_pickle=args.allow_pickle)
    report = run_memorisation(settings, args.out, progress=not args.quiet)
    print(format_report(report))
    print(f"wrote {Path(args.out) / 'memorisation.json'} and {Path(args.out) / 'closest_pairs.png'}")
    return 0


def cmd_eval_faithfulness(args: argparse.Namespace) -> int:
    from carrara.evaluate.faithfulness import faithfulness_report, format_report

    if args.classifier is None and args.classifier_scale is not None:
        raise CarraraError("--classifier-scale steers a classifier's guidance: give it with --classifier RUN")
    report = faithfulness_report(args.model, args.n, args.guidance, steps=args.steps, sampler=args.sampler,
                                 seed=args.seed, out=args.out, progress=not args.quiet, allow_pickle=args.allow_pickle,
                                 classifier=args.classifier,
                                 classifier_scale=1.0 if args.classifier_scale is None else args.classifier_scale,
                                 precision=args.precision)
    print(format_report(report))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from carrara.evaluate.retrieval import DEFAULT_INDEX, ClipIndex
    from carrara.models.clip import ClipScorer

    index = ClipIndex.build(args.data, ClipScorer.load(args.clip), args.clip, progress=not args.quiet)
    out = index.save(args.out or DEFAULT_INDEX)
    print(f"indexed {len(index.files)} images of {index.root} in {out} "
          f"({'faiss IndexFlatIP' if type(index.index).__name__ != 'ExactIndex' else 'exact torch search'}, "
          f"{index.embeddings.shape[1]}-d CLIP embeddings): carrara search \"…\" --index {out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import time

    from carrara.evaluate.retrieval import ClipIndex, contact_sheet, embed_query, search
    from carrara.fileio import save_image_atomic
    from carrara.models.clip import ClipScorer

    if Path(args.out).suffix.lower() not in SHEET_SUFFIXES:
        raise CarraraError(f"-o {args.out}: the contact sheet is an image: end the name in {', '.join(SHEET_SUFFIXES)}")
    check_writable(args.out, "-o")
    started = time.perf_counter()
    index = ClipIndex.load(args.index)
    scorer = ClipScorer.load(args.clip or index.clip)
    index.check_clip(scorer)
    embed_query(scorer, "warm-up")  # first calls of the text tower set up kernels and the tokenizer: part of loading
    loaded = time.perf_counter()
    result = search(index, scorer, args.query, args.k)
    for rank, hit in enumerate(result["hits"], 1):
        print(f"{rank:3d}. {hit['score']:.4f}  {index.root / hit['file']}  ({hit['text']})")
    save_image_atomic(args.out, contact_sheet(index, result))
    print(f"search: {result['ms']:.1f} ms after loading (query embedding {result['ms_embed']:.1f} ms, kNN "
          f"{result['ms_knn']:.2f} ms over {len(index.files)} images); loading took {loaded - started:.2f} s; "
          f"contact sheet {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from carrara.export import export_default, export_diffusers, export_student
    from carrara.modelfolder import PACKAGED, PACKAGED_BUDGET_MB

    if args.export_command == "unclip":
        from carrara.unclip import assemble_unclip

        out = assemble_unclip(args.decoder, args.prior, args.out)
        print(f"wrote {out}: try carrara generate \"a happy kitty\" --model {out}, or --variations picture.png")
        return 0
    if args.export_command == "cascade":
        from carrara.upsampler import assemble_cascade

        out = assemble_cascade(args.base, args.upsampler, args.out)
        print(f"wrote {out}: try carrara generate \"a cat face\" --model {out} (--size 64 for the base alone)")
        return 0
    if args.export_command == "student":
        model = PACKAGED / args.into_package if args.into_package else args.model
        r = export_student(args.student, model, bits=args.bits, max_mb=PACKAGED_BUDGET_MB.get(args.into_package))
        print(f"wrote {r['out']} ({r['delta_mb']:.1f} MB; the model's weights {r['model_mb']:.1f} MB); its images "
              f"differ from the run's by {r['mean_abs_dpixel_255']:.2f}/255 on average. Try carrara generate "
              f"\"a cat face\" --fast" + ("" if args.into_package == "default" else f" --model {model}"))
        return 0
    if args.export_command == "diffusers":
        result = export_diffusers(args.model, args.out)
        print(f"wrote {result['out']}: load it with diffusers.StableDiffusionPipeline.from_pretrained({result['out']!r})")
        return 0
    out = PACKAGED / args.into_package if args.into_package else args.out
    result = export_default(args.model, out, autoencoder_run=args.autoencoder, upsampler_run=args.upsampler,
                            max_mb=PACKAGED_BUDGET_MB.get(args.into_package, PACKAGED_BUDGET_MB["default"]))
    print(f"wrote {result['out']} ({result['weights_mb']:.1f} MB of fp16 weights"
          + (f", with the student from {result['student']})" if result["student"] else ")"))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from carrara.generate import generate_command

    return generate_command(args)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Calibrate the int8 U-Net over sampling runs, store it beside the weights, and check its images against fp32."""
    from carrara.evaluate.suite import read_prompts
    from carrara.modelfolder import resolve
    from carrara.models import int8
    from carrara.pipeline import Pipeline
    from carrara.upsampler import FOLDER as UPSAMPLER_FOLDER

    prompts = (read_prompts(args.prompts) if args.prompts else int8.calibration_prompts(args.n))[:args.n]
    pipe = Pipeline.load(args.model, precision="fp32", fast=args.fast)
    # the folder the pipeline read the U-Net from: a model's unet/, an unCLIP decoder's, the student's beside its
    # teacher (--fast) or a student run's own
    root, unet_dir = resolve(pipe.unclip.decoder if pipe.unclip else args.model).root, pipe.unet_dir
    # a cascade's upsampler is calibrated with its model (the student shares it: --fast leaves it as it is)
    up_dir = root / UPSAMPLER_FOLDER / "unet" if pipe.upsampler is not None and not args.fast else None
    int8.check_cpu()
    for folder in (unet_dir, up_dir):  # before the calibration run, not after
        if folder is not None:
            check_writable(folder / int8.CALIBRATION_FILE, "the calibration")
    settings = {**pipe.sampling, "output": "latent"}  # the model's own sampling (every step, both guidance halves)
    print(f"carrara quantize: calibrating on {len(prompts)} prompts …", flush=True)
    record = int8.calibrate(pipe.unet, lambda ps, seed: pipe(ps, seed=seed, **settings), prompts, pipe.model_hash,
                            {k: v for k, v in settings.items() if k != "output"})
    path = int8.write_calibration(unet_dir, record)
    print(f"wrote {path}: {len(record['layers'])} layers in int8, {len(record['kept_fp32'])} kept fp32")
    if up_dir is not None:  # on the base's images, at the upsampler's recorded settings
        print(f"carrara quantize: calibrating the upsampler on {len(prompts)} prompts …", flush=True)
        up = int8.calibrate(pipe.upsampler.unet, lambda ps, seed: pipe(ps, seed=seed, **settings | {"output": "tensor"}),
                            prompts, pipe.upsampler.weights_hash, dataclasses.asdict(pipe.upsampler.settings))
        path = int8.write_calibration(up_dir, up)
        print(f"wrote {path}: {len(up['layers'])} layers in int8, {len(up['kept_fp32'])} kept fp32")
    quantized, check = Pipeline.load(args.model, precision="int8", fast=args.fast), list(int8.QUALITY_PROMPTS)
    diff = int8.pixel_diff_255(pipe(check, **settings | {"output": "tensor"}),
                               quantized(check, **settings | {"output": "tensor"}))
    ran = "the U-Net" if quantized.upsampler is None else \
        f"the U-Net and {'the' if int8.is_int8(quantized.upsampler.unet) else 'not the'} upsampler"
    print(f"quality: mean |Δpixel| int8 vs fp32 = {diff:.2f}/255 over {len(check)} prompts, same seeds, {ran} in "
          f"int8 (target ≤ 2/255){'' if diff <= 2 else ': ABOVE the target, keep fp32'}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile the U-Net ahead of time (models/compiled.py), keep it beside the weights if its images are eager's and
    it is faster. Whatever stops it before the end (an error, a mismatch, Ctrl-C) leaves no package behind."""
    from carrara.modelfolder import resolve
    from carrara.models import compiled as aot
    from carrara.models import int8
    from carrara.pipeline import Pipeline

    pipe = Pipeline.load(args.model, precision=args.precision, auto_int8=False)  # compiles fp32 or bf16
    if pipe.unclip is not None:
        raise CarraraError("carrara compile takes a text-conditioned model; an unCLIP decoder's context also holds "
                           "its image tokens, which the compiled U-Net does not take yet")
    auto_is_int8 = args.precision == "auto" and pipe.precision == "fp32"
    if auto_is_int8 and int8.calibrated(pipe.unet_dir, pipe.model_hash) is not None:
        print(f"carrara compile: note: without native bf16 here, generate and serve sample {args.model} in int8 "
              "(precision auto); the compiled fp32 U-Net serves --precision fp32", flush=True)
    pipe.compiled = None  # eager, for the check
    unet_dir = resolve(args.model).unet
    folder, tokens = aot.package_dir(unet_dir), pipe.text_encoder.max_length
    paths = {b: folder / aot.package_name(pipe.model_hash, pipe.precision, b, tokens, frozen=args.freeze)
             for b in args.batches}
    if folder != unet_dir / aot.PACKAGE_DIR:  # the model's folder is read-only: the user's cache
        folder.mkdir(parents=True, exist_ok=True)
    check_writable(paths[args.batches[0]] if folder.is_dir() else unet_dir / folder.name, "the compiled U-Net")
    kept = False
    try:
        kept = _compile_and_check(pipe, paths, tokens, args.keep, args.freeze)
    finally:  # an error, Ctrl-C or "not kept": no package and no empty compiled/ folder is left
        if not kept:
            for path in paths.values():
                path.unlink(missing_ok=True)
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return 0


def _compile_and_check(pipe, paths: dict, tokens: int, keep: bool, frozen: bool) -> bool:
    """Compile a package per batch size, compare its images with eager and time both; True if they are to be kept."""
    import statistics
    import time

    from tqdm.auto import tqdm

    from carrara.models import compiled as aot
    from carrara.models import int8

    seconds = 0.0
    with tqdm(list(paths), desc="compiling", unit="batch size") as bar:
        for b in bar:
            bar.set_postfix(batch=b)
            seconds += aot.compile_unet(pipe.unet, paths[b], batch=b, tokens=tokens, frozen=frozen)
    compiled = aot.Package({b: (tokens, path) for b, path in paths.items()}, pipe.unet.config, pipe.unet, load_after=0)
    if compiled.get(0) is None:
        raise CarraraError(f"the packages compiled in {seconds:.0f} s do not load here; none was kept")
    # at the base's side: a cascade's upsampler is not compiled and would only dilute the comparison
    settings, check = {**pipe.sampling, "output": "tensor", "size": pipe.sizes[0]}, list(int8.QUALITY_PROMPTS)

    def timed(net) -> tuple:
        """The check batch's images and seconds, and one image's seconds (median of 3), with `net` (None: eager)."""
        pipe.compiled = net
        pipe(check[:1], **settings)  # warm-up
        started = time.perf_counter()
        images = pipe(check, **settings)
        batch = time.perf_counter() - started
        one = []
        for _ in range(3):
            started = time.perf_counter()
            pipe(check[:1], **settings)
            one.append(time.perf_counter() - started)
        return images, batch, statistics.median(one)

    (eager, b_eager, t_eager), (fast, b_fast, t_fast) = timed(None), timed(compiled)
    diff = int8.pixel_diff_255(eager, fast)
    speed = (f"one image ({settings['steps']} steps) {t_eager:.2f} s eager, {t_fast:.2f} s compiled "
             f"({t_eager / t_fast:.2f}×, median of 3); {len(check)} images {b_eager:.1f} s vs {b_fast:.1f} s "
             f"({b_eager / b_fast:.2f}×)")
    if diff > aot.COMPILED_TOLERANCE_255:
        raise CarraraError(f"the compiled U-Net's images differ from eager by {diff:.2f}/255 (more than "
                           f"{aot.COMPILED_TOLERANCE_255}/255); none was kept")
    if max(t_eager / t_fast, b_eager / b_fast) < aot.MIN_SPEEDUP and not keep:
        print(f"carrara compile: not kept — the compiled U-Net is not faster on this CPU: {speed} (--keep keeps it)")
        return False
    size = sum(path.stat().st_size for path in paths.values()) / 2**20
    n = len(paths)
    print(f"wrote {n} package{'s' if n > 1 else ''} (U-Net batch{'es' if n > 1 else ''} {', '.join(map(str, paths))}; "
          f"{size:.0f} MB) to {next(iter(paths.values())).parent} in {seconds:.0f} s; mean |Δpixel| compiled vs eager "
          f"{diff:.3f}/255 over {len(check)} prompts; {speed}. A process loads it once it has run "
          f"{aot.LOAD_AFTER_PASSES} U-Net image-passes (CARRARA_COMPILED=1: at once, 0: never)")
    return True


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model, then serve the page and API until Ctrl-C."""
    from carrara.pipeline import Pipeline
    from carrara.serve.app import LOOPBACK_HOSTS, create_app, is_loopback, listen, server
    from carrara.serve.search import Searcher

    loopback = is_loopback(args.host)
    if not loopback:
        print(f"carrara: warning: serving on {args.host}: anyone who can reach port {args.port} can generate images "
              "and read the gallery (there is no authentication)", file=sys.stderr)
    sock = listen(args.host, args.port)
    try:
        searcher = Searcher.load(args.index) if args.index else None  # before the model: a bad index fails at once
        pipe = Pipeline.load(args.model, allow_pickle=args.allow_pickle, precision=args.precision,
                             auto_int8=not args.lora)  # LoRA merges into fp32 weights
        if args.lora:  # merged into the starting model's U-Net; pipe.loras is what its PNGs should record
            pipe.merge_loras(args.lora)
        app = create_app(pipe, args.data_dir, allowed_hosts=LOOPBACK_HOSTS if loopback else None,
                         models_dir=args.models, load=functools.partial(Pipeline.load, allow_pickle=args.allow_pickle,
                                                                        precision=args.precision),  # every model
                         searcher=searcher)
        host, port = sock.getsockname()[:2]
        url_host = f"[{host}]" if ":" in host else host
        print(f"carrara serve: model {app.state.jobs.model_ref} ({pipe.model_hash}) on http://{url_host}:{port}/ "
              f"— gallery in {Path(args.data_dir).resolve()}; Ctrl-C stops", flush=True)
        print(f"carrara serve: {app.state.gallery.summary()}", flush=True)
        print(f"carrara serve: models {', '.join(app.state.models.choices)} (GET /api/models)", flush=True)
        if searcher is not None:
            print(f"carrara serve: {searcher.summary()}", flush=True)
        server(app).run(sockets=[sock])
    finally:
        sock.close()
    return 0
