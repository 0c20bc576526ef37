"""`emoji`: every fully-qualified emoji rendered from a color emoji font, captioned with its CLDR-style name.

Names come from the `emoji` package (`EMOJI_DATA[e]["en"]`, e.g. `:woman_detective_medium-dark_skin_tone:`),
turned back into the Unicode CLDR short-name form: the base name, then ": " and the modifiers
("woman detective: medium-dark skin tone", "flag: France", "kiss: woman, man, light skin tone, dark skin tone").
Glyphs the font cannot draw (blank, the .notdef glyph, or a sequence that falls apart into several glyphs)
are skipped and counted.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import emoji as emoji_package
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from carrara.data.build import check_side, claim_folder, remove_stale
from carrara.data.emoji_groups import group_captions, load_subgroups
from carrara.errors import CarraraError
from carrara.fileio import save_image_atomic, write_text_atomic

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"  # Debian: fonts-noto-color-emoji
FONT_SIZE = 109  # NotoColorEmoji's only bitmap strike; FreeType refuses any other size for it
MARGIN = 1 / 16  # white border kept on each side, as a fraction of the image side
_PAD = 24  # transparent room around the glyph on the drawing canvas (glyphs overhang their advance box)
_REFERENCE = "\U0001F600"  # 😀, present in every color emoji font; used to test the font and its advance width
_UNASSIGNED = "\u0378"  # an unassigned code point: what the font draws for a missing glyph (.notdef)

_TONE = re.compile(r"_(light|medium-light|medium|medium-dark|dark)_skin_tone")
_HAIR = re.compile(r"(man|woman|person)_(red_hair|curly_hair|white_hair|blond_hair|bald|beard)")
_GROUP = re.compile(r"(family|kiss|couple_with_heart)((?:_(?:man|woman|person|adult|child|boy|girl))+)")


def _is_flag(emoji: str) -> bool:
    """Regional-indicator pairs (🇫🇷) and tag sequences (🏴 + tags, England/Scotland/Wales)."""
    if len(emoji) == 2 and all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in emoji):
        return True
    return emoji.startswith("\U0001F3F4") and emoji.endswith("\U000E007F")


def parse_name(en: str, emoji: str = "") -> tuple[str, list[str], list[str]]:
    """Split an `emoji`-package name into (base, modifiers, skin tones), all readable, in CLDR order."""
    body = en.strip(":")
    tones = [f"{m.group(1)} skin tone" for m in _TONE.finditer(body)]
    body = _TONE.sub("", body)
    modifiers: list[str] = []
    if m := _HAIR.fullmatch(body):
        body, modifiers = m.group(1), [m.group(2)]
    elif m := _GROUP.fullmatch(body):
        body, modifiers = m.group(1), m.group(2).strip("_").split("_")
    elif body.startswith("keycap_"):
        body, modifiers = "keycap", [body[len("keycap_"):]]
    elif emoji and _is_flag(emoji):
        body, modifiers = "flag", [body]
    return body.replace("_", " "), [x.replace("_", " ") for x in modifiers], tones


def readable_name(en: str, emoji: str = "") -> str:
    """`:man_dark_skin_tone_red_hair:` → "man: dark skin tone, red hair" (CLDR short-name form)."""
    base, modifiers, tones = parse_name(en, emoji)
    if base in ("family", "kiss", "couple with heart", "keycap", "flag"):
        rest = modifiers + tones  # members first: "kiss: woman, man, light skin tone, dark skin tone"
    else:
        rest = tones + modifiers  # tone first: "man: dark skin tone, red hair"
    return f"{base}: {', '.join(rest)}" if rest else base


def base_name(en: str, emoji: str = "") -> str:
    """The concept without skin tones ("woman detective", "kiss: woman, man"), for balanced sampling."""
    base, modifiers, _ = parse_name(en, emoji)
    return f"{base}: {', '.join(modifiers)}" if modifiers else base


def fully_qualified() -> dict[str, dict]:
    """The `emoji` package's fully-qualified emoji, in its order: {emoji: its EMOJI_DATA entry}."""
    status = emoji_package.STATUS["fully_qualified"]
    return {e: d for e, d in emoji_package.EMOJI_DATA.items() if d["status"] == status}


def _draw(font: ImageFont.FreeTypeFont, text: str) -> Image.Image | None:
    """Draw `text` in color on a transparent canvas; return it cropped to the ink, or None if blank."""
    _, _, right, bottom = font.getbbox(text)
    canvas = Image.new("RGBA", (max(right, 1) + 2 * _PAD, max(bottom, 1) + 2 * _PAD), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((_PAD, _PAD), text, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    return canvas.crop(box) if box else None


def fit_on_white(glyph: Image.Image, size: int) -> Image.Image:
    """Centre an RGBA glyph on a white square with a MARGIN border and resize it to `size` (LANCZOS)."""
    side = math.ceil(max(glyph.size) / (1 - 2 * MARGIN))
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


@dataclass
class EmojiFont:
    """A color emoji font at FONT_SIZE, with what a missing glyph looks like in it."""

    font: ImageFont.FreeTypeFont
    advance: float  # width of one emoji glyph (😀)
    notdef: bytes | None  # RGBA bytes of the .notdef glyph, None if it is blank

    def render(self, emoji: str, size: int = 64) -> tuple[Image.Image | None, str]:
        """(RGB image, "") if the font draws `emoji` as one glyph, else (None, why it was skipped)."""
        if self.font.getlength(emoji) > 1.5 * self.advance:
            return None, "font draws it as several glyphs"
        glyph = _draw(self.font, emoji)
        if glyph is None or glyph.tobytes() == self.notdef:
            return None, "glyph missing from font"
        return fit_on_white(glyph, size), ""


def load_font(font: str | Path | None = None) -> EmojiFont:
    """Open a color emoji font at FONT_SIZE, or raise a one-line CarraraError saying how to get one."""
    path = Path(font or DEFAULT_FONT)
    if not path.is_file():
        raise CarraraError(f"emoji font {path} not found: apt-get install fonts-noto-color-emoji, "
                           "or pass --font PATH to a color emoji font")
    try:
        loaded = ImageFont.truetype(str(path), FONT_SIZE)
    except OSError as e:
        raise CarraraError(f"cannot load {path} as a color emoji font at size {FONT_SIZE} ({e}); "
                           "use NotoColorEmoji.ttf from fonts-noto-color-emoji") from None
    glyph = _draw(loaded, _REFERENCE)
    rgba = np.asarray(glyph if glyph else Image.new("RGBA", (1, 1)), dtype=np.int16)  # (H, W, 4)
    colored = (rgba[..., 3] > 128) & (rgba[..., :3].max(-1) - rgba[..., :3].min(-1) > 60)
    if colored.sum() < 100:
        raise CarraraError(f"{path} is not a color emoji font (it draws {_REFERENCE} without color); "
                           "use NotoColorEmoji.ttf from fonts-noto-color-emoji")
    notdef = _draw(loaded, _UNASSIGNED)
    return EmojiFont(loaded, loaded.getlength(_REFERENCE), notdef.tobytes() if notdef else None)


def _readable_alias(alias: str) -> str:
    return alias.strip(":").replace("_", " ")


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


MAX_CAPTIONS = 8  # caption variants kept per emoji (the cached text states grow with this)

# Category captions: the head noun of a name (its last word) for the kinds with many emoji. Every name caption
# picks out one emoji, so a model trained on names alone learns to predict the image from the text and stops
# reading its noisy input: "a flag" then gives one blend of flags for every seed (docs/decisions.md, 2026-11-30,
# session 12). A caption shared by all the flags asks for a choice among them, as real captions do.
CATEGORIES = {"flag": "a flag", "face": "a face", "heart": "a heart", "hand": "a hand", "arrow": "an arrow",
              "square": "a square", "o’clock": "a clock", "circle": "a circle", "moon": "a moon", "ball": "a ball",
              "cat": "a cat", "star": "a star", "tree": "a tree", "cloud": "a cloud", "car": "a car", "book": "a book",
              "medal": "a medal", "dog": "a dog", "boat": "a boat", "shoe": "a shoe", "monkey": "a monkey",
              "diamond": "a diamond", "banknote": "a banknote", "box": "a box"}


def category_caption(name: str) -> str | None:
    """"flag: France" → "a flag", "grinning face" → "a face", "nine o’clock" → "a clock"; None for other names."""
    words = name.partition(": ")[0].split()
    return CATEGORIES.get(words[-1].lower()) if words else None


def caption_variants(name: str, aliases: list[str], *, category: bool = False, groups: Iterable[str] = ()) -> list[str]:
    """Ways people write an emoji's name: the CLDR name first, then aliases, templates and plain forms.

    "cat face" → ["cat face", "cat", "smiley cat", "an emoji of a cat face", "cat face icon", "a cat", …];
    "woman detective: medium-dark skin tone" → [..., "woman detective with medium-dark skin", ...];
    "flag: France" → [..., "flag of France", "France flag", ...]. Deterministic, at most MAX_CAPTIONS.
    With `category`, the kind's caption ("a flag") comes second, and `groups` (its CLDR subgroup's captions,
    data/emoji_groups.py: "a mammal", "an animal") next, so neither is cut.
    """
    out = [name]
    kind = category_caption(name) if category else None
    if kind:
        out.append(kind)
    out += groups
    head, _, tail = name.partition(": ")
    plain = [a for a in aliases if not a.startswith("flag for ")]
    if head == "flag" and tail:
        out += [f"flag of {tail}", f"{tail} flag"]
    elif tail and "skin tone" in tail:
        tone = tail.split(",")[0].replace(" skin tone", "")
        out += [f"{head} with {tone} skin", f"{tone} skinned {head}"]
    out += plain
    short = head[:-len(" face")] if head.endswith(" face") and not tail else ""
    if short:
        out.append(short)
    noun = short or (head if not tail else "")
    if noun:
        out.append(_article(noun))
    subject = f"flag of {tail}" if head == "flag" and tail else head  # a tone-less name matches every tone
    out += [f"an emoji of {_article(subject) if not tail else name}", f"{subject} icon", f"{subject} emoji"]
    seen, unique = set(), []
    for c in out:
        c = " ".join(c.split())
        if c and c.lower() not in seen:
            seen.add(c.lower())
            unique.append(c)
    return unique[:MAX_CAPTIONS]


CATEGORY_MODES = ("kinds", "groups")  # `--categories`: the 24 kinds' captions; those and the CLDR subgroups'


def build_emoji(out, size: int = 64, font: str | Path | None = None, *, only: Iterable[str] | None = None,
                progress: bool = True, overwrite: bool = False, categories: bool | str = False,
                emoji_test: str | Path | None = None) -> dict:
    """Render every fully-qualified emoji (or just `only`) to `out` with a metadata.jsonl of CLDR-style names.

    `categories`: "kinds" (or True) adds each kind's caption (`category_caption`: "a flag"); "groups" adds those and
    the captions of its CLDR subgroup (data/emoji_groups.py, from `emoji_test`: "a mammal", "an animal"), and
    records the subgroup. A non-empty `out` is refused unless `overwrite` (data/build.py)."""
    check_side(size, 8, "emoji")
    mode = "kinds" if categories is True else (categories or "")
    if mode and mode not in CATEGORY_MODES:
        raise CarraraError(f"categories must be one of {', '.join(CATEGORY_MODES)}, not {categories!r}")
    subgroups = load_subgroups(emoji_test) if mode == "groups" else {}
    loaded = load_font(font)
    table = fully_qualified()
    if only is not None:
        only = list(only)
        unknown = [e for e in only if e not in table]
        if unknown:
            raise CarraraError(f"not fully-qualified emoji: {' '.join(unknown)}")
        table = {e: table[e] for e in only}
    out, old = claim_folder(out, overwrite=overwrite)
    skipped: Counter = Counter()
    lines, written = [], set()
    for emoji, data in tqdm(table.items(), desc="emoji", unit="img", disable=not progress or len(table) < 500, leave=False):
        image, reason = loaded.render(emoji, size)
        if image is None:
            skipped[reason] += 1
            continue
        file_name = "-".join(f"{ord(c):x}" for c in emoji) + ".png"
        try:
            save_image_atomic(out / file_name, image)
        except OSError as e:
            raise CarraraError(f"cannot write {out / file_name}: {e.strerror or e}") from None
        written.add(out / file_name)
        record = {
            "file_name": file_name,
            "text": readable_name(data["en"], emoji),
            "emoji": emoji,
            "codepoints": " ".join(f"U+{ord(c):04X}" for c in emoji),
            "aliases": [_readable_alias(a) for a in data.get("alias", [])],
            "captions": caption_variants(readable_name(data["en"], emoji),
                                         [_readable_alias(a) for a in data.get("alias", [])], category=bool(mode),
                                         groups=group_captions(emoji, subgroups)),
            "base": base_name(data["en"], emoji),
            "emoji_version": data["E"],
        }
        if subgroups:
            record["subgroup"] = subgroups.get(emoji, "")
        lines.append(json.dumps(record, ensure_ascii=False))
    if not lines:
        raise CarraraError(f"the font drew none of the {len(table)} emoji; use NotoColorEmoji.ttf")
    write_text_atomic(out / "metadata.jsonl", "\n".join(lines) + "\n")
    remove_stale(old, written)
    return {"written": len(lines), "skipped": sum(skipped.values()), "skipped_reasons": dict(skipped), "out": str(out)}
