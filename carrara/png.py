"""PNG files that say how to make them again: generation settings in carrara's JSON tEXt chunk, and the same settings
as AUTOMATIC1111's `parameters` text ("infotext"), which A1111, ComfyUI tools, InvokeAI and image sites read.

The infotext is A1111's (modules/processing.py `create_infotext`, modules/infotext_utils.py
`parse_generation_parameters`): the prompt, a line "Negative prompt: …", then one line of "Key: value" pairs joined
by ", ", a value holding ',', ':' or a newline written as a JSON string. `read_png_metadata` reads carrara's chunk,
else an A1111 `parameters` chunk, so a PNG made by those tools works with `carrara generate --from`.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from carrara.errors import CarraraError
from carrara.fileio import atomic_path

KEY = "carrara"
PARAMETERS = "parameters"  # AUTOMATIC1111's text key
# carrara's sampler names → A1111's (k-diffusion's names as its menu shows them). Plain DPM++ 2M reads as "dpmpp"
# unless the infotext also says "Schedule type: Karras" (A1111 ≥ 1.9 writes the σ spacing apart from the sampler).
A1111_SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp": "DPM++ 2M", "dpmpp_karras": "DPM++ 2M Karras",
                  "euler": "Euler", "euler_a": "Euler a", "lcm": "LCM"}
_KEY_NAME = re.compile(r"\w[\w \-/]+")  # a key as A1111's re_param reads it
_SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")
MIN_PAIRS = 3  # A1111: a last line with fewer "Key: value" pairs is part of the prompt


def quote(value) -> str:
    """A1111's quote(): a value with ',', ':' or a newline becomes a JSON string, so the line still splits."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(x) -> str:
    """7 for 7.0, else the float's shortest exact form (4.25): what reads back as the same number."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def infotext(metadata: dict) -> str:
    """carrara's settings as A1111's infotext: "prompt\\nNegative prompt: …\\nSteps: 20, Sampler: …, CFG scale: 4, …"."""
    sampler, guidance = metadata.get("sampler"), metadata.get("guidance")
    pairs = {"Steps": metadata.get("steps"), "Sampler": A1111_SAMPLERS.get(sampler, sampler) if isinstance(
                 sampler, str) else sampler,
             "CFG scale": _number(guidance) if isinstance(guidance, (int, float)) else guidance,
             "Seed": metadata.get("seed"),
             "Size": None if metadata.get("size") is None else f"{metadata['size']}x{metadata['size']}",
             "Model hash": metadata.get("model_hash"),
             "Model": None if metadata.get("model") is None else Path(str(metadata["model"])).name,
             "Denoising strength": metadata.get("strength")}  # img2img and inpainting
    line = ", ".join(f"{k}: {quote(v)}" for k, v in pairs.items() if v is not None)
    negative = metadata.get("negative_prompt") or ""
    return f"{metadata.get('prompt', '')}" + (f"\nNegative prompt: {negative}" if negative else "") + f"\n{line}"


def _quoted_end(line: str, start: int) -> int:
    """The index of the quote closing the JSON string that opens at line[start], or -1."""
    i = start + 1
    while i < len(line):
        if line[i] == "\\":
            i += 2
        elif line[i] == '"':
            return i
        else:
            i += 1
    return -1


def parameter_pairs(line: str) -> list[tuple[str, str]]:
    """'Steps: 20, Model: "a, b"' → [("Steps", "20"), ("Model", "a, b")], as A1111's re_param reads it, in one pass
    (the regular expression backtracks quadratically on a long line without a colon: a hostile chunk's trap)."""
    pairs, i = [], 0
    while (colon := line.find(":", i)) >= 0:
        key, j = line[i:colon].strip(), colon + 1
        while j < len(line) and line[j] == " ":
            j += 1
        end = _quoted_end(line, j) if line.startswith('"', j) else -1
        if end >= 0:
            try:
                value = json.loads(line[j:end + 1])
            except ValueError:  # A1111's unquote keeps text it cannot decode
                value = line[j:end + 1]
            comma = line.find(",", end)
        else:
            comma = line.find(",", j)
            value = line[j:comma if comma >= 0 else len(line)].strip()
        if _KEY_NAME.fullmatch(key):
            pairs.append((key, value))
        if comma < 0:
            break
        i = comma + 1
    return pairs


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) of an A1111 infotext, read as parse_generation_parameters reads it."""
    *lines, last = text.strip().split("\n")
    pairs = parameter_pairs(last)
    if len(pairs) < MIN_PAIRS:
        lines, pairs = [*lines, last], []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), dict(pairs)


def _as(kind, value: str, key: str, where: str):
    try:
        return kind(value)
    except ValueError:
        name = "a whole number" if kind is int else "a number"
        raise CarraraError(f"{where}: its {PARAMETERS!r} text gives {key} {value[:40]!r}, not {name}") from None


def settings_from_infotext(text: str, where: str) -> dict:
    """An A1111 infotext as carrara's metadata keys (prompt, negative_prompt, steps, sampler, guidance, seed, size,
    model_hash, and an edit's strength); an unknown sampler name is kept as A1111 wrote it, for the caller to refuse or override."""
    prompt, negative, params = parse_infotext(text)
    meta = {"prompt": prompt, "negative_prompt": negative}
    if "Steps" in params:
        meta["steps"] = _as(int, params["Steps"], "Steps", where)
    if "CFG scale" in params:
        meta["guidance"] = _as(float, params["CFG scale"], "CFG scale", where)
    if "Seed" in params:
        meta["seed"] = _as(int, params["Seed"], "Seed", where)
    if "Sampler" in params:
        name = params["Sampler"]
        if name == "DPM++ 2M" and params.get("Schedule type") == "Karras":
            name = "DPM++ 2M Karras"
        meta["sampler"] = {a: c for c, a in A1111_SAMPLERS.items()}.get(name, name)
    if "Size" in params:
        size = _SIZE.fullmatch(params["Size"])
        if size is None or size[1] != size[2]:
            raise CarraraError(f"{where}: its {PARAMETERS!r} text gives Size {params['Size'][:40]!r}; carrara makes "
                               "square images (WxW): give --size")
        meta["size"] = int(size[1])
    if "Model hash" in params:
        meta["model_hash"] = params["Model hash"]
    if "Denoising strength" in params:
        meta["strength"] = _as(float, params["Denoising strength"], "Denoising strength", where)
    return meta


def _pnginfo(metadata: dict) -> PngImagePlugin.PngInfo:
    """`metadata` as JSON in the 'carrara' tEXt chunk, as A1111's infotext in 'parameters', the prompt also as the
    standard 'Description'."""
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, json.dumps(metadata, ensure_ascii=False, sort_keys=True))
    if "prompt" in metadata:
        info.add_text(PARAMETERS, infotext(metadata))
        info.add_text("Description", str(metadata["prompt"]))
    info.add_text("Software", "carrara")
    return info


def save_png(path: str | Path, image: Image.Image, metadata: dict) -> None:
    """Write `image` to `path` atomically with `metadata` as JSON in the 'carrara' tEXt chunk."""
    save_pngs([(path, image, metadata)])


def save_pngs(items: list[tuple[str | Path, Image.Image, dict]]) -> None:
    """Write several (path, image, metadata) PNGs all or none: every file is written under a temporary name and
    renamed only once all of them are written, so a failure (disk full, Ctrl-C) leaves no half of a set."""
    with contextlib.ExitStack() as stack:
        for path, image, metadata in items:
            tmp = stack.enter_context(atomic_path(Path(path)))
            image.save(tmp, format="PNG", pnginfo=_pnginfo(metadata))


def read_png_metadata(path: str | Path) -> dict:
    """The generation settings a PNG carries: carrara's chunk, else an A1111 `parameters` chunk read as carrara's
    keys (`settings_from_infotext`); or a one-line CarraraError."""
    try:
        with Image.open(path) as im:
            chunks = im.text if hasattr(im, "text") else {}
            text, parameters = chunks.get(KEY), chunks.get(PARAMETERS)
    except FileNotFoundError:
        raise CarraraError(f"{path}: no such file") from None
    except Image.DecompressionBombError:
        raise CarraraError(f"{path}: the image is too large to read (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError) as e:
        raise CarraraError(f"{path}: not a readable PNG ({e})") from None
    if text is None and isinstance(parameters, str):
        return settings_from_infotext(parameters, str(path))
    if text is None:
        raise CarraraError(f"{path} carries no generation metadata (neither carrara's chunk nor an AUTOMATIC1111 "
                           f"{PARAMETERS!r} chunk)")
    try:
        meta = json.loads(text)
    except ValueError:
        raise CarraraError(f"{path}: its carrara metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CarraraError(f"{path}: its carrara metadata is not a JSON object of settings")
    return meta
