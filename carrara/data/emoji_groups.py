"""The CLDR group and subgroup of every emoji, from Unicode's emoji-test.txt, as generic captions ("an animal").

A caption that names one emoji asks for that emoji; a request such as "an animal" or "a fruit" asks for a choice
among many. A model trained on names alone answers it with one image (docs/default-model.md, diversity), so
`carrara data build emoji --categories groups` adds the captions of each emoji's subgroup: 🐈 (animal-mammal) gets
"a mammal" and "an animal", 🍓 (food-fruit) "a fruit" and "food". Unicode orders every emoji under a `# group:` and
a `# subgroup:` line of emoji-test.txt (Unicode Technical Standard #51, §"Emoji test data"); Debian ships it in
`unicode-data` (/usr/share/unicode/emoji/emoji-test.txt, Unicode 15.0), which `make setup` installs.
"""
from __future__ import annotations

from pathlib import Path

from carrara.errors import CarraraError

EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"  # Debian: unicode-data

# subgroup → its captions, the specific first. Subgroups without an entry (skin-tone, hair-style: components; a few
# symbol lists) get none. The generic requests of bench/diversity.py's held-out list are worded differently on
# purpose ("some animal", "a critter"): they test whether the model generalises the request, not the string.
_PERSON = ("a person",)
_VEHICLE = "a vehicle"
_SYMBOL = "a symbol"
SUBGROUP_CAPTIONS: dict[str, tuple[str, ...]] = {
    **{f"face-{k}": ("a smiley", "a face") for k in (
        "smiling", "affection", "tongue", "hand", "neutral-skeptical", "sleepy", "unwell", "hat", "glasses",
        "concerned", "negative", "costume")},
    "cat-face": ("a cat", "an animal"), "monkey-face": ("a monkey", "an animal"),
    "heart": ("a heart", _SYMBOL), "emotion": (_SYMBOL,),
    **{k: ("a hand gesture", "a hand") for k in (
        "hand-fingers-open", "hand-fingers-partial", "hand-single-finger", "hand-fingers-closed", "hands",
        "hand-prop")},
    "body-parts": ("a body part",),
    "person": _PERSON, "person-gesture": _PERSON, "person-role": ("a job", "a person"),
    "person-fantasy": ("a fantasy character", "a person"), "person-activity": ("an activity", "a person"),
    "person-sport": ("an athlete", "a sport"), "person-resting": _PERSON, "family": ("a family", "people"),
    "person-symbol": (_SYMBOL,),
    "animal-mammal": ("a mammal", "an animal"), "animal-bird": ("a bird", "an animal"),
    "animal-amphibian": ("an amphibian", "an animal"), "animal-reptile": ("a reptile", "an animal"),
    "animal-marine": ("a sea animal", "an animal"), "animal-bug": ("an insect", "an animal"),
    "plant-flower": ("a flower", "a plant"), "plant-other": ("a plant",),
    "food-fruit": ("a fruit", "food"), "food-vegetable": ("a vegetable", "food"),
    "food-prepared": ("a meal", "food"), "food-asian": ("asian food", "food"), "food-marine": ("seafood", "food"),
    "food-sweet": ("a sweet", "food"), "drink": ("a drink",), "dishware": ("tableware",),
    "place-map": ("a map", "a place"), "place-geographic": ("a landscape", "a place"),
    "place-building": ("a building", "a place"), "place-religious": ("a place of worship", "a building"),
    "place-other": ("a place",),
    "transport-ground": ("a road vehicle", _VEHICLE), "transport-water": ("a boat", _VEHICLE),
    "transport-air": ("an aircraft", _VEHICLE), "hotel": ("luggage",), "time": ("a clock", "time"),
    "sky & weather": ("weather", "the sky"),
    "event": ("a celebration",), "award-medal": ("an award",), "sport": ("sports equipment", "a sport"),
    "game": ("a game",), "arts & crafts": ("art",),
    "clothing": ("clothing",), "sound": ("a sound",), "music": ("music",),
    "musical-instrument": ("a musical instrument", "music"), "phone": ("a phone", "a device"),
    "computer": ("a computer", "a device"), "light & video": ("a light",), "book-paper": ("paper",), "money": ("money",),
    "mail": ("mail",), "writing": ("a writing tool",), "office": ("office supplies",), "lock": ("a lock",),
    "tool": ("a tool",), "science": ("science",), "medical": ("medicine",), "household": ("a household item",),
    "other-object": ("an object",),
    "transport-sign": ("a sign", _SYMBOL), "warning": ("a warning sign", _SYMBOL), "arrow": ("an arrow", _SYMBOL),
    "religion": ("a religious symbol", _SYMBOL), "zodiac": ("a zodiac sign", _SYMBOL),
    "av-symbol": ("a button", _SYMBOL), "gender": (_SYMBOL,), "math": ("a math symbol", _SYMBOL),
    "punctuation": (_SYMBOL,), "currency": ("a currency symbol", _SYMBOL), "other-symbol": (_SYMBOL,),
    "keycap": ("a keycap", _SYMBOL), "alphanum": ("a letter button", _SYMBOL), "geometric": ("a shape",),
    "flag": ("a flag",), "country-flag": ("a country flag", "a flag"), "subdivision-flag": ("a flag",),
}


def load_subgroups(path: str | Path | None = None) -> dict[str, str]:
    """{emoji: its subgroup} for every fully-qualified emoji of emoji-test.txt, or one error line."""
    path = Path(path or EMOJI_TEST)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CarraraError(f"{path} not found: the CLDR groups come from Unicode's emoji-test.txt "
                           "(apt-get install unicode-data)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CarraraError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    subgroup, out = None, {}
    for line in lines:
        if line.startswith("# subgroup:"):
            subgroup = line.partition(":")[2].strip()
        elif line and not line.startswith("#") and "; fully-qualified" in line.split("#")[0]:
            points = line.partition(";")[0].split()
            try:
                emoji = "".join(chr(int(p, 16)) for p in points)
            except ValueError:
                raise CarraraError(f"{path}: not an emoji-test.txt line: {line[:60]!r}") from None
            if subgroup is None:
                raise CarraraError(f"{path}: an emoji before any '# subgroup:' line: not Unicode's emoji-test.txt")
            out[emoji] = subgroup
    if not out:
        raise CarraraError(f"{path} lists no fully-qualified emoji: not Unicode's emoji-test.txt")
    return out


def group_captions(emoji: str, subgroups: dict[str, str]) -> tuple[str, ...]:
    """The generic captions of an emoji's subgroup ("a mammal", "an animal"), or () if it has none."""
    return SUBGROUP_CAPTIONS.get(subgroups.get(emoji, ""), ())
