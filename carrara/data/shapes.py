"""`shapes`: procedural captioned images with exact ground truth (shape, color, size, position, relation).

Every image is one or two flat shapes on a black background. All geometry is defined by the module-level
constants below, in fractions of the image side (x to the right, y down, continuous coordinates in which
pixel (i, j) covers [i, i+1) × [j, j+1)), so an analytic detector can import them and read the images back:

- colors: eight saturated hues at least ~27° apart (`COLOR_HUES`); the background is black, so
  anti-aliasing only scales a color's brightness and never changes its hue;
- size: an object's bounding box has its larger side `2 * SIZES[size]` (small 1/5, large 2/5 of the side);
- position: the bounding-box centre is `POSITIONS[position]` plus a uniform jitter of at most
  `POSITION_JITTER` on each axis, so the nearest anchor always names the position;
- relation (two objects only): "A left of B" means A's bounding box ends left of B's by at least
  `MIN_GAP`, likewise "right of", "above" (smaller y) and "below"; the two colors always differ.
"""
from __future__ import annotations

import colorsys
import json
import math
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from carrara.data.build import check_side, claim_folder, remove_stale
from carrara.errors import CarraraError
from carrara.fileio import save_image_atomic, write_text_atomic

BACKGROUND: tuple[int, int, int] = (0, 0, 0)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 30, 30),
    "orange": (255, 120, 0),
    "yellow": (250, 230, 0),
    "green": (40, 200, 40),
    "cyan": (0, 210, 210),
    "blue": (40, 90, 255),
    "purple": (160, 60, 230),
    "pink": (255, 90, 200),
}
COLOR_HUES: dict[str, float] = {name: 360 * colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLORS.items()}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES: dict[str, float] = {"small": 0.10, "large": 0.20}  # half the larger bounding-box side
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.50),
    "right": (0.75, 0.50),
    "top": (0.50, 0.25),
    "bottom": (0.50, 0.75),
    "center": (0.50, 0.50),
}
POSITION_JITTER = 0.02
MIN_GAP = 0.05  # smallest empty space between two objects' bounding boxes
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SUPERSAMPLE = 8  # 8×8 samples per pixel: anti-aliasing by exact area coverage (a box filter)

POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}  # b's relation to a
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
SINGLE_TEMPLATES = (
    "a {size} {color} {shape} {where}",
    "{article} {color} {shape}, {size}, {where}",
    "a picture of a {size} {color} {shape} {where}",
)
PAIR_TEMPLATES = (
    "a {a} {relation} a {b}",
    "a picture of a {a} {relation} a {b}",
    "two shapes: a {a} {relation} a {b}",
)
_AXES = {"x": ("left", "center", "right"), "y": ("top", "center", "bottom")}


def _regular_star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    return [((1 if k % 2 == 0 else inner) * math.sin(math.pi * k / points),
             -(1 if k % 2 == 0 else inner) * math.cos(math.pi * k / points)) for k in range(2 * points)]


def _fit_unit_box(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Scale and shift a polygon so its bounding box is centred at 0 with larger side 2."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    s = 2 / max(max(xs) - min(xs), max(ys) - min(ys))
    return tuple(((x - mx) * s, (y - my) * s) for x, y in points)


_ARM = 0.35  # half-width of the cross's arms
_OUTLINES: dict[str, tuple[tuple[float, float], ...]] = {  # unit outlines; the circle is drawn as an ellipse
    "square": ((-1, -1), (1, -1), (1, 1), (-1, 1)),
    "triangle": ((0, -1), (1, 1), (-1, 1)),
    "diamond": ((0, -1), (1, 0), (0, 1), (-1, 0)),
    "star": _fit_unit_box(_regular_star()),
    "cross": ((-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
              (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)),
}


def half_extent(shape: str) -> tuple[float, float]:
    """Half width and half height of `shape`'s bounding box, in units of its `r`."""
    return _HALF_EXTENTS[shape]


_HALF_EXTENTS = {"circle": (1.0, 1.0), **{shape: (max(abs(x) for x, _ in outline), max(abs(y) for _, y in outline))
                                          for shape, outline in _OUTLINES.items()}}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    position: str
    cx: float  # bounding-box centre, fraction of the side
    cy: float
    r: float  # half the larger bounding-box side, fraction of the side (= SIZES[size])

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) as fractions of the side."""
        hx, hy = half_extent(self.shape)
        return self.cx - hx * self.r, self.cy - hy * self.r, self.cx + hx * self.r, self.cy + hy * self.r


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    relation: str | None = None  # objects[0] <relation> objects[1]


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str, gap: float = MIN_GAP) -> bool:
    """True iff `a <relation> b` holds for the bounding boxes with at least `gap` between them."""
    ax0, ay0, ax1, ay1 = a.bbox()
    bx0, by0, bx1, by1 = b.bbox()
    return {"left of": ax1 + gap <= bx0, "right of": bx1 + gap <= ax0,
            "above": ay1 + gap <= by0, "below": by1 + gap <= ay0}[relation]


def place(rng: random.Random, shape: str, color: str, size: str, position: str) -> ShapeObject:
    """An object with these words at its position's anchor, moved by a random jitter (what varies among the images
    of one one-object caption)."""
    ax, ay = POSITIONS[position]
    return ShapeObject(shape, color, size, position, ax + rng.uniform(-POSITION_JITTER, POSITION_JITTER),
                       ay + rng.uniform(-POSITION_JITTER, POSITION_JITTER), SIZES[size])


def sample_attributes(rng: random.Random, *, two_object_fraction: float = 0.5) -> Scene:
    """Draw a random scene: one object, or (with probability `two_object_fraction`) two related ones."""
    if rng.random() >= two_object_fraction:
        return Scene((place(rng, rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)),
                             rng.choice(list(POSITIONS))),))
    while True:  # rejection sampling: only pairs whose relation holds with a clear gap
        axis = rng.choice(list(_AXES))
        first, second = sorted(rng.sample(range(3), 2))  # a lies before b along the axis
        ca, cb = rng.sample(list(COLORS), 2)
        a = place(rng, rng.choice(SHAPES), ca, rng.choice(list(SIZES)), _AXES[axis][first])
        b = place(rng, rng.choice(SHAPES), cb, rng.choice(list(SIZES)), _AXES[axis][second])
        relation = "left of" if axis == "x" else "above"
        if relation_holds(a, b, relation):
            if rng.random() < 0.5:  # name the later object first half of the time
                return Scene((b, a), INVERSE[relation])
            return Scene((a, b), relation)


def caption(scene: Scene, template: int = 0) -> str:
    """The scene in words, using SINGLE_TEMPLATES or PAIR_TEMPLATES[template]."""
    if scene.relation is None:
        o = scene.objects[0]
        article = "an" if o.color[0] in "aeiou" else "a"
        return SINGLE_TEMPLATES[template].format(size=o.size, color=o.color, shape=o.shape, article=article,
                                                 where=POSITION_PHRASES[o.position])
    a, b = (f"{o.size} {o.color} {o.shape}" for o in scene.objects)
    return PAIR_TEMPLATES[template].format(a=a, b=b, relation=RELATION_PHRASES[scene.relation])


# the words a caption names things with: the longest phrase first, so "to the left of" is a relation, not "left"
_RELATION_WORDS = sorted([(p, r) for r, p in RELATION_PHRASES.items()] + [(r, r) for r in RELATIONS],
                         key=lambda pr: -len(pr[0]))
_POSITION_WORDS = sorted([(p, k) for k, p in POSITION_PHRASES.items()]
                         + [(f"{k} side", k) for k in ("left", "right")] + [(k, k) for k in POSITIONS]
                         + [("centre", "center"), ("middle", "center")],
                         key=lambda pk: -len(pk[0]))


def _phrase(words) -> re.Pattern:
    """Any of `words` as whole words (a plural -s or -es allowed)."""
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")(?:es|s)?\b")


_FINDERS = {"shape": _phrase(SHAPES), "color": _phrase(COLORS), "size": _phrase(SIZES)}
_RELATION_FINDERS = [(_phrase([p]), r) for p, r in _RELATION_WORDS]
_POSITION_FINDERS = [(_phrase([p]), k) for p, k in _POSITION_WORDS]


def _read_object(text: str) -> dict:
    """The attributes one object's words name (the first word of each kind)."""
    return {name: m.group(1) for name, pattern in _FINDERS.items() if (m := pattern.search(text))}


def read_caption(text: str) -> tuple[list[dict], str | None] | None:
    """A caption's objects (the attributes it names of each: shape, color, size, position) and its relation, read
    back from its words — the inverse of `caption` for every template, and lenient with other wordings ("a red star
    left of a blue circle", "green squares"): what classifier guidance toward the prompt needs. A relation splits the
    caption into its two objects, each of which must name a colour and a shape (how a pair is told apart); one object
    needs a colour or a shape. None when the text names no such object or pair, or two colours, shapes or sizes
    without one of the four relations between them."""
    text = " ".join(text.lower().replace(",", " ").split())
    for pattern, relation in _RELATION_FINDERS:
        if m := pattern.search(text):
            a, b = _read_object(text[:m.start()]), _read_object(text[m.end():])
            return ([a, b], relation) if all({"shape", "color"} <= o.keys() for o in (a, b)) else None
    if not (o := _read_object(text)) or any(len(set(p.findall(text))) > 1 for p in _FINDERS.values()):
        return None  # nothing, or two objects without a relation carrara reads ("a red circle and a blue square")
    position = next((k for pattern, k in _POSITION_FINDERS if pattern.search(text)), None)
    return [{**o, **({"position": position} if position else {})}], None


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v), in units of r from the bounding-box centre, lie inside `shape` (even-odd rule)."""
    if shape == "circle":
        return u * u + v * v < 1
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    outline = _OUTLINES[shape]
    for (xa, ya), (xb, yb) in zip(outline, outline[1:] + outline[:1]):
        if ya == yb:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (ya > v) != (yb > v)
        inside ^= crosses & (u < xa + (v - ya) * (xb - xa) / (yb - ya))
    return inside


def coverage(o: ShapeObject, size: int) -> np.ndarray:
    """Fraction of each pixel of a `size`×`size` image covered by `o`, from SUPERSAMPLE² samples per pixel."""
    cov = np.zeros((size, size))  # (H, W)
    x0, y0, x1, y1 = o.bbox()
    c0, r0 = max(0, math.floor(x0 * size)), max(0, math.floor(y0 * size))
    c1, r1 = min(size, math.ceil(x1 * size)), min(size, math.ceil(y1 * size))
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sample centres inside one pixel
    xs = ((np.arange(c0, c1)[:, None] + offsets).ravel() / size - o.cx) / o.r  # (W_box * S,)
    ys = ((np.arange(r0, r1)[:, None] + offsets).ravel() / size - o.cy) / o.r  # (H_box * S,)
    inside = _inside(o.shape, xs[None, :], ys[:, None])  # (H_box * S, W_box * S)
    cov[r0:r1, c0:c1] = inside.reshape(r1 - r0, SUPERSAMPLE, c1 - c0, SUPERSAMPLE).mean(axis=(1, 3))
    return cov


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw `scene` as an RGB `size`×`size` image; each pixel is its exact (supersampled) coverage × color."""
    pixels = np.zeros((size, size, 3)) + BACKGROUND  # (H, W, 3)
    for o in scene.objects:  # objects never overlap, so each pixel mixes one color with the background
        cov = coverage(o, size)[..., None]  # (H, W, 1)
        pixels = pixels * (1 - cov) + cov * np.array(COLORS[o.color], dtype=np.float64)
    return Image.fromarray(np.rint(pixels).astype(np.uint8))


def scene_metadata(scene: Scene, size: int) -> dict:
    """Ground truth for one metadata.jsonl line; centres, radii and boxes in pixels of a `size` image."""
    objects = [{"shape": o.shape, "color": o.color, "size": o.size, "position": o.position,
                "center": [round(o.cx * size, 3), round(o.cy * size, 3)], "radius": round(o.r * size, 3),
                "bbox": [round(v * size, 3) for v in o.bbox()]} for o in scene.objects]
    return {"objects": objects, "relation": scene.relation}


def build_shapes(out, n: int = 2000, size: int = 64, seed: int = 0, *, two_object_fraction: float = 0.5,
                 progress: bool = True, overwrite: bool = False) -> dict:
    """Write `n` captioned shape images and metadata.jsonl to `out`; same seed → byte-identical files.

    A non-empty `out` is refused unless `overwrite` (data/build.py)."""
    if n < 1:
        raise CarraraError(f"n must be at least 1, got {n}")
    check_side(size, 16, "shapes")
    if not 0 <= two_object_fraction <= 1:
        raise CarraraError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
    out, old = claim_folder(out, overwrite=overwrite)
    rng = random.Random(seed)
    width = max(5, len(str(n - 1)))
    lines = []
    for i in tqdm(range(n), desc="shapes", unit="img", disable=not progress or n < 500, leave=False):
        scene = sample_attributes(rng, two_object_fraction=two_object_fraction)
        templates = SINGLE_TEMPLATES if scene.relation is None else PAIR_TEMPLATES
        text = caption(scene, rng.randrange(len(templates)))
        file_name = f"{i:0{width}d}.png"
        try:
            save_image_atomic(out / file_name, render(scene, size))
        except OSError as e:
            raise CarraraError(f"cannot write {out / file_name}: {e.strerror or e}") from None
        lines.append(json.dumps({"file_name": file_name, "text": text, **scene_metadata(scene, size)}))
    write_text_atomic(out / "metadata.jsonl", "\n".join(lines) + "\n")
    remove_stale(old, {out / f"{i:0{width}d}.png" for i in range(n)})
    return {"written": len(lines), "skipped": 0, "out": str(out)}
