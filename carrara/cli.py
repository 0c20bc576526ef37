"""The `carrara` command line: the argument parser; the handlers are in commands.py (each imports its module
lazily, so `--help` is instant)."""
from __future__ import annotations

import argparse
import sys

import carrara
from carrara import commands as handlers
from carrara.diffusion.settings import DEFAULTS, SAMPLER_NAMES
from carrara.errors import CarraraError
from carrara.hardware import keep_freed_memory

PRECISION_AUTO = ("auto: bf16 where the CPU has native bf16, else int8 where the model has an int8 calibration of its "
                  "weights (`carrara quantize`; the default model ships them), else fp32")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def _batch_sizes(text: str) -> list[int]:
    """--batches: U-Net batch sizes, whole numbers from 1 to 256 separated by commas, each once, in order."""
    try:
        sizes = sorted({int(s) for s in text.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1 or sizes[-1] > 256:
        raise argparse.ArgumentTypeError(f"give batch sizes from 1 to 256 separated by commas (e.g. 2,4,8), got {text!r}")
    return sizes


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def _sampling_flags(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--steps, --sampler, --guidance with the defaults of diffusion/settings.py (as values, or only in the help)."""
    d = DEFAULTS
    parser.add_argument("--steps", type=_positive_int, default=d.steps if defaults else None,
                        help=f"denoising steps (default {d.steps})")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default=d.sampler if defaults else None,
                        help=f"default {d.sampler}")
    parser.add_argument("--guidance", type=_nonnegative_float, default=d.guidance if defaults else None,
                        help=f"classifier-free guidance w (default {d.guidance:g})")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus where to look), not a usage dump."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="carrara", description="A readable text-to-image diffusion system.")
    parser.add_argument("--version", action="version", version=f"carrara {carrara.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    data = commands.add_parser("data", help="build and inspect captioned image datasets")
    data_cmds = data.add_subparsers(dest="data_command", metavar="ACTION", required=True, parser_class=_Parser)
    build = data_cmds.add_parser("build", help="build a dataset folder (images + metadata.jsonl)")
    build.add_argument("dataset", choices=["shapes", "emoji"], help="which dataset to build")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--n", type=_positive_int, default=None, help="number of images (shapes; default 2000)")
    build.add_argument("--size", type=_positive_int, default=64, help="image side in pixels (default 64, at most 1024)")
    build.add_argument("--seed", type=int, default=0, help="random seed (shapes)")
    build.add_argument("--two-object-fraction", type=float, default=None, metavar="F",
                       help="shapes: the share of scenes with two related objects, in [0, 1] (default 0.5)")
    build.add_argument("--font", default=None, help="color emoji font (emoji; default Debian's NotoColorEmoji.ttf)")
    build.add_argument("--overwrite", action="store_true", help="replace the dataset in a non-empty --out folder")
    build.add_argument("--categories", nargs="?", const="kinds", choices=("kinds", "groups"), default=None,
                       help="emoji: add each kind's caption (\"a flag\" for every flag) to its captions; 'groups' "
                       "also its CLDR subgroup's (\"a mammal\", \"an animal\"; Debian's unicode-data)")
    build.add_argument("--emoji-test", default=None, help="Unicode's emoji-test.txt for --categories groups "
                       "(default /usr/share/unicode/emoji/emoji-test.txt)")
    build.set_defaults(func=handlers.cmd_data_build)
    info = data_cmds.add_parser("info", help="load a dataset folder and report what it holds")
    info.add_argument("path", help="dataset folder, or shards like 'shards/{000000..000009}.tar'")
    info.add_argument("--show", type=int, default=3, help="captions to print")
    info.set_defaults(func=handlers.cmd_data_info)
    shard = data_cmds.add_parser("shard", help="pack a dataset folder into WebDataset tar shards")
    shard.add_argument("folder", help="dataset folder (images + metadata.jsonl or .txt captions)")
    shard.add_argument("--out", required=True, help="new folder for 000000.tar, 000001.tar, …")
    shard.add_argument("--size", type=_positive_int, default=1000, help="samples per shard (default 1000)")
    shard.add_argument("--quiet", action="store_true", help="no progress bar")
    shard.set_defaults(func=handlers.cmd_data_shard)
    train = commands.add_parser("train", help="train one stage: autoencoder, then diffusion, then (for a cascade) "
                                "upsampler; clip for evaluation")
    train.add_argument("stage", choices=["autoencoder", "diffusion", "upsampler", "clip", "family", "prior",
                                         "classifier", "decoder"])
    train.add_argument("--data", required=True, help="dataset folder (images + metadata.jsonl), "
                       "or tar shards: 'shards/{000000..000099}.tar'")
    train.add_argument("--out", required=True, help="run folder to create (or continue with --resume)")
    train.add_argument("--autoencoder", help="autoencoder run folder (diffusion and classifier stages); "
                       "diffusion also takes 'pixels' or 'pixels:F' to generate the image itself (docs/routes.md)")
    train.add_argument("--from", dest="from_model", help="diffusion: fine-tune this model (default, a run, a diffusers "
                       "folder) on --data with its own autoencoder and text encoder; fewer steps, lower lr")
    train.add_argument("--lora-rank", type=_positive_int, help="with --from: train only LoRA adapters of this rank "
                       "on the attention projections, saved as OUT/lora.safetensors")
    train.add_argument("--kind", default="vae", help="family stage: which generative family of the lectures "
                       "(default vae; carrara/families/ lists them, an unknown name too)")
    train.add_argument("--vqvae", help="family stage, --kind ar: the trained VQ-VAE run whose codes the prior models")
    train.add_argument("--clip", help="prior and decoder stages: the `carrara train clip` run whose image embeddings "
                       "the prior generates and the unCLIP decoder is conditioned on")
    train.add_argument("--size", type=_positive_int, default=None,
                       help="image side in pixels (default 64; upsampler: the high-resolution side, default 128)")
    train.add_argument("--steps", type=_positive_int, help="training steps")
    train.add_argument("--batch-size", type=_positive_int, help="global batch size (shared by torchrun's processes)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field, e.g. train.lr=1e-4")
    train.add_argument("--allow-pickle", action="store_true", help="let --autoencoder weights be a pickle "
                       "(.bin/.ckpt/.pt), read with torch.load(weights_only=True); default: safetensors only")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=handlers.cmd_train)

    distill = commands.add_parser("distill", help="distil a model into a few-step student with guidance built in "
                                  "(latent consistency distillation, docs/distill.md)")
    distill.add_argument("--teacher", default=None, help="the model to distil (default: the packaged model)")
    distill.add_argument("--data", default=None, help="captioned images the teacher's trajectories start from")
    distill.add_argument("--out", required=True, help="run folder to create (or continue with --resume)")
    distill.add_argument("--recipe", default=None, help="a distillation recipe TOML, e.g. recipes/distill-shapes.toml")
    distill.add_argument("--steps", type=_positive_int, help="training steps")
    distill.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    distill.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field, e.g. "
                         "guidance_max=6 or train.lr=1e-5")
    distill.add_argument("--allow-pickle", action="store_true", help="let the teacher's weights be pickles (.bin), "
                         "read weights-only; default: safetensors only")
    distill.add_argument("--quiet", action="store_true", help="no progress bars")
    distill.set_defaults(func=handlers.cmd_distill)

    recipe = commands.add_parser("recipe", help="run a recipe file: build data, train every stage, evaluate")
    recipe.add_argument("recipe", help="recipe TOML, e.g. recipes/shapes.toml")
    recipe.add_argument("--out", required=True, help="folder for the recipe's data and runs")
    recipe.add_argument("--resume", action="store_true", help="skip finished stages, resume the unfinished one")
    recipe.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. diffusion.train.steps=100")
    recipe.add_argument("--quiet", action="store_true", help="no progress bars")
    recipe.set_defaults(func=handlers.cmd_recipe)

    index = commands.add_parser("index", help="a k-nearest-neighbour index of a dataset's CLIP image embeddings")
    index.add_argument("data", help="dataset folder (images + metadata.jsonl or .txt captions)")
    index.add_argument("--clip", required=True, help="a `carrara train clip` run: the embedding space")
    index.add_argument("--out", default=None, help="index file to write (default carrara-index.safetensors)")
    index.add_argument("--quiet", action="store_true", help="no progress bars")
    index.set_defaults(func=handlers.cmd_index)
    search = commands.add_parser("search", help="the images of an index nearest to words or to a picture")
    search.add_argument("query", help="words (\"a happy kitty\") or an image file")
    search.add_argument("--index", default="carrara-index.safetensors", help="index file (default "
                        "carrara-index.safetensors, from carrara index)")
    search.add_argument("--k", type=_positive_int, default=8, help="how many images (default 8)")
    search.add_argument("--clip", default=None, help="the CLIP run, if it moved since the index was built")
    search.add_argument("-o", "--out", default="carrara-search.png", help="contact sheet PNG (default "
                        "carrara-search.png)")
    search.set_defaults(func=handlers.cmd_search)

    ev = commands.add_parser("eval", help="measure a model: FD, KID, CLIP score, faithfulness",
                             description="carrara eval --model RUN --data DIR --clip CLIP_RUN --out REPORT_DIR "
                                         "(or: carrara eval faithfulness --model RUN)")
    ev.add_argument("--model", help="model or run folder to evaluate")
    ev.add_argument("--data", help="dataset folder: real images (FD, KID) and the captions to generate from")
    ev.add_argument("--n", type=_positive_int, default=2000, help="images to generate (default 2000)")
    ev.add_argument("--metrics", default="fd,kid,clipscore",
                    help="comma list of fd,kid,clipscore,retrieval,faithfulness,nll")
    ev.add_argument("--prompts", default=None, help="text file of prompts to generate from (default: the data's captions)")
    ev.add_argument("--clip", help="a `carrara train clip` run: features for FD/KID and the CLIP score")
    ev.add_argument("--inception-weights", help="pytorch-fid's pt_inception-2015-12-05 file: FID on Inception-v3")
    _sampling_flags(ev, defaults=False)  # None: the model's own (a distilled student's 4 lcm steps)
    ev.add_argument("--fast", action="store_true", help="judge the model's few-step student (`carrara export "
                    "student`), at its own steps unless --steps")
    ev.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                    help=f"the U-Net's precision (default {PRECISION_AUTO})")
    ev.add_argument("--seed", type=int, default=0, help="seed for captions and noise (default 0)")
    ev.add_argument("--bootstrap", type=_positive_int, default=50, help="bootstrap resamples for intervals (50)")
    ev.add_argument("--out", help="report folder: metrics.json, report.html, samples.png")
    ev.add_argument("--allow-pickle", action="store_true", help="let model or Inception weights be pickles (.bin/.pth), read weights-only; default: safetensors only")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=handlers.cmd_eval)
    ev_cmds = ev.add_subparsers(dest="eval_command", metavar="METRIC", required=False, parser_class=_Parser)
    faith = ev_cmds.add_parser("faithfulness", help="share of generated shapes with the right color/position/size/shape")
    faith.add_argument("--model", required=True, help="model or run folder trained on shapes")
    faith.add_argument("--n", type=_positive_int, default=200, help="prompts per setting (default 200)")
    _sampling_flags(faith, defaults=True)
    faith.add_argument("--seed", type=int, default=0, help="seed for prompts and noise (default 0)")
    faith.add_argument("--out", default=None, help="write the report JSON here")
    faith.add_argument("--classifier", default=None, metavar="RUN", help="also guide every image toward its "
                       "caption's ground truth with this `carrara train classifier` run (one object: its attributes; "
                       "two objects: their relations and shapes)")
    faith.add_argument("--classifier-scale", type=_nonnegative_float, default=None,
                       help="with --classifier: the guidance scale s (default 1)")
    faith.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                       help=f"the U-Net's precision (default {PRECISION_AUTO})")
    faith.add_argument("--allow-pickle", action="store_true", help="let the model's weights be pickles (.bin), read weights-only; default: safetensors only")
    faith.add_argument("--quiet", action="store_true", help="no progress bar")
    faith.set_defaults(func=handlers.cmd_eval_faithfulness)
    memo = ev_cmds.add_parser("memorisation", help="nearest training image of generated ones (CLIP and pixels); "
                              "share closer than real near-duplicates")
    memo.add_argument("--model", required=True, help="model or run folder")
    memo.add_argument("--data", required=True, help="its training dataset folder")
    memo.add_argument("--clip", required=True, help="a `carrara train clip` run: the CLIP space")
    memo.add_argument("--n", type=_positive_int, default=200, help="images to generate (default 200)")
    memo.add_argument("--quantile", type=float, default=0.5, help="which quantile of the near-duplicates' "
                      "distances is the threshold (default 0.5, the median)")
    _sampling_flags(memo, defaults=True)
    memo.add_argument("--seed", type=int, default=0, help="seed for captions and noise (default 0)")
    memo.add_argument("--out", default="memorisation", help="report folder (default ./memorisation)")
    memo.add_argument("--allow-pickle", action="store_true", help="let the model's weights be pickles (.bin), "
                      "read weights-only; default: safetensors only")
    memo.add_argument("--quiet", action="store_true", help="no progress bar")
    memo.set_defaults(func=handlers.cmd_eval_memorisation)

    export = commands.add_parser("export", help="package a trained model")
    export_cmds = export.add_subparsers(dest="export_command", metavar="FORMAT", required=True)
    default = export_cmds.add_parser("default", help="copy a diffusion run into the package as the default model (fp16)")
    default.add_argument("--model", required=True, help="diffusion run folder, or a cascade model folder")
    default.add_argument("--autoencoder", default=None, help="its autoencoder run (its log is copied too)")
    default.add_argument("--upsampler", default=None, help="a cascade's upsampler run (its log is copied too)")
    where = default.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", default=None, help="destination folder")
    where.add_argument("--into-package", nargs="?", const="default", choices=("default", "shapes"), default=None,
                       help="replace a model in the installed package: default (the default) or shapes "
                       "(carrara/assets/NAME; at most 100 / 20 MB)")
    default.set_defaults(func=handlers.cmd_export)
    cascade = export_cmds.add_parser("cascade", help="a base model and an upsampler run as one cascade model folder")
    cascade.add_argument("--base", required=True, help="diffusion run or model folder (the 64-px base)")
    cascade.add_argument("--upsampler", required=True, help="`carrara train upsampler` run folder")
    cascade.add_argument("--out", required=True, help="new folder to write")
    cascade.set_defaults(func=handlers.cmd_export)
    unclip = export_cmds.add_parser("unclip", help="an unCLIP model folder: a decoder run and a prior run (same CLIP)")
    unclip.add_argument("--decoder", required=True, help="`carrara train decoder` run folder")
    unclip.add_argument("--prior", required=True, help="`carrara train prior` run folder")
    unclip.add_argument("--out", required=True, help="new folder to write")
    unclip.set_defaults(func=handlers.cmd_export)
    student = export_cmds.add_parser("student", help="put a `carrara distill` student beside its teacher (a 4-bit "
                                     "difference, checked by sampling): --fast then uses it")
    student.add_argument("--student", required=True, help="`carrara distill` run folder")
    into = student.add_mutually_exclusive_group(required=True)
    into.add_argument("--model", default=None, help="its teacher's model folder (gets student/)")
    into.add_argument("--into-package", nargs="?", const="default", choices=("default", "shapes"), default=None,
                      help="its teacher is a packaged model: default (the default) or shapes, within its budget")
    student.add_argument("--bits", type=int, default=4, choices=(4, 8), help="bits per weight of the difference "
                         "(default 4)")
    student.set_defaults(func=handlers.cmd_export)
    to_diffusers = export_cmds.add_parser("diffusers", help="a Stable Diffusion folder that diffusers loads offline")
    to_diffusers.add_argument("--model", required=True, help="diffusion run or model folder")
    to_diffusers.add_argument("--out", required=True, help="new folder to write")
    to_diffusers.set_defaults(func=handlers.cmd_export)

    gen = commands.add_parser(
        "generate", help="make images from a prompt",
        description="Make images from a prompt. -o out.png is the image; with --n K it is the grid, and each image "
                    "is also saved alone as out-0.png … out-{K-1}.png (image i uses seed + i, its PNG says so). "
                    "Nothing is overwritten: if a name is taken the set is numbered out-00001.png, out-00002.png, … "
                    "(out-00001-0.png … for the single images) unless --overwrite.")
    gen.add_argument("prompt", nargs="?", help="what to draw")
    gen.add_argument("--model", default=None, help="model or run folder (default: the packaged model)")
    _sampling_flags(gen, defaults=False)  # None = not given: --from's value, else the default
    gen.add_argument("--negative", default=None, help="negative prompt (default: none)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (default 0); image i uses seed + i")
    gen.add_argument("--size", type=_positive_int, default=None, help="image side: the base model's (64), or the "
                     "cascade's (128, the default when the model has an upsampler stage)")
    gen.add_argument("--n", type=_positive_int, default=None,
                     help="number of images (default 1, or the --from PNG's); more than 1: a grid plus one PNG each")
    gen.add_argument("-o", "--out", default=None, help="output PNG (default carrara.png; numbered if it exists)")
    gen.add_argument("--overwrite", action="store_true", help="replace existing output files instead of numbering")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default=None,
                     help=f"U-Net precision (default {PRECISION_AUTO})")
    gen.add_argument("--fast", action="store_true", help="sample with the model's few-step student (4 steps, guidance "
                     "built in; `carrara export student` puts one beside its teacher)")
    gen.add_argument("--from", dest="from_png", default=None, help="re-create an image from its PNG metadata")
    gen.add_argument("--init", default=None, metavar="IMAGE", help="img2img: start from this picture (centre-cropped "
                     "to a square) instead of noise (SDEdit)")
    gen.add_argument("--strength", type=float, default=None, help="with --init: how much to change it, in (0, 1] "
                     "(default 0.8; 1.0 with --mask; 1 ignores the picture except where a mask keeps it)")
    gen.add_argument("--mask", default=None, metavar="IMAGE", help="with --init: inpaint — regenerate where the mask "
                     "is white, keep the picture where it is black")
    gen.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]", help="merge a LoRA adapter into the U-Net "
                     "at WEIGHT (default 1); repeatable")
    gen.add_argument("--classifier", default=None, metavar="RUN", help="classifier guidance (Dhariwal & Nichol 2021) "
                     "with this `carrara train classifier` run, towards what the prompt names (a pair: both relations and shapes) "
                     "or --classes")
    gen.add_argument("--classes", default=None, help='with --classifier: the wanted classes instead of the prompt\'s, '
                     'e.g. "shape=star,color=red"')
    gen.add_argument("--classifier-scale", type=_nonnegative_float, default=None,
                     help="with --classifier: the guidance scale s (default 1)")
    gen.add_argument("--variations", default=None, metavar="IMAGE", help="unCLIP model: images like this picture "
                     "(its CLIP embedding decoded from new noise; the prompt, if any, is the decoder's text)")
    gen.add_argument("--interpolate", nargs=2, default=None, metavar=("A", "B"), help="unCLIP model: a strip of "
                     "--n images (default 5) from picture A to B (slerp of their CLIP embeddings, one noise)")
    gen.add_argument("--text-diff", default=None, metavar="CAPTION", help="unCLIP model, with --variations IMAGE: "
                     "move its embedding toward CAPTION away from the prompt (its old caption, default empty)")
    gen.add_argument("--amount", type=float, default=None, help="with --text-diff: how far, θ in [0, 1] (default "
                     "0.5); with --n K a strip from 0 to θ")
    gen.add_argument("--prior-guidance", type=_nonnegative_float, default=None, help="unCLIP model: the prior's "
                     "classifier-free guidance scale (default: the prior's recorded one)")
    gen.add_argument("--allow-pickle", action="store_true", help="let the model's weights be pickles (.bin), read weights-only; default: safetensors only")
    gen.set_defaults(func=handlers.cmd_generate)

    serve = commands.add_parser("serve", help="a local web page and HTTP API for generating images")
    serve.add_argument("--model", default="default", help="model or run folder (default: the packaged model)")
    serve.add_argument("--models", default=None, metavar="DIR", help="a folder of model folders the page can switch "
                       "to (each loaded on first use), besides the packaged ones")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    serve.add_argument("--data-dir", default="carrara-gallery", help="where generated images are kept "
                       "(default ./carrara-gallery)")
    serve.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]", help="merge a LoRA adapter into the "
                       "model's U-Net at WEIGHT (default 1); repeatable")
    serve.add_argument("--allow-pickle", action="store_true", help="let the model's weights be pickles (.bin), read weights-only; default: safetensors only")
    serve.add_argument("--index", default=None, help="a CLIP retrieval index (from carrara index): the page gets a "
                       "search box over its images")
    serve.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                       help=f"every served model's U-Net precision (default {PRECISION_AUTO}; int8 needs each "
                            "model's calibration)")
    serve.set_defaults(func=handlers.cmd_serve)

    quantize = commands.add_parser("quantize", help="calibrate a model's int8 U-Net (for --precision int8) and "
                                   "check it against fp32")
    quantize.add_argument("--model", default="default", help="model or run folder (default: the packaged model)")
    quantize.add_argument("--prompts", default=None, metavar="FILE", help="calibration prompts, one per line "
                          "(default: emoji names)")
    quantize.add_argument("--n", type=_positive_int, default=64, help="how many prompts to calibrate on (default 64)")
    quantize.add_argument("--fast", action="store_true", help="calibrate the few-step student beside the model "
                          "(for generate --fast --precision int8) instead of the model's own U-Net")
    quantize.set_defaults(func=handlers.cmd_quantize)

    compiled = commands.add_parser("compile", help="compile a model's U-Net ahead of time for this CPU kind "
                                   "(AOTInductor; once per machine kind, model and precision) and check it against "
                                   "eager; generate and serve then load it")
    compiled.add_argument("--model", default="default", help="model or run folder (default: the packaged model)")
    compiled.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                          help="the U-Net precision to compile (default auto: bf16 where the CPU has native bf16)")
    compiled.add_argument("--batches", type=_batch_sizes, default=[2, 4, 8, 16, 32], metavar="B,B,…",
                          help="U-Net batch sizes to compile, one package each (default 2,4,8,16,32: 1 to 16 guided "
                          "images; a call pads to the next size)")
    compiled.add_argument("--keep", action="store_true", help="keep the package even if it is not faster here "
                          "(by default it must be ≥ 1.05× eager for one image or 16)")
    compiled.add_argument("--no-freeze", dest="freeze", action="store_false", help="code-only packages, handed the "
                          "weights at load: a few MB each instead of a copy of the weights each, but without "
                          "inductor's freezing (prepacked weights), which is where compiling pays on bf16 CPUs")
    compiled.set_defaults(func=handlers.cmd_compile)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # before any tensor: large activations are reused, not page-faulted in on every step
    try:
        return args.func(args)
    except CarraraError as e:
        print(f"carrara: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("carrara: interrupted", file=sys.stderr)
        return 130
