"""An analytic detector for `shapes` images: color segmentation, connected components, shape descriptors.

It reads an image back into the attributes `carrara.data.shapes` draws (shape, color, size, position,
relation), in the spirit of GenEval's object-focused checks (Ghosh et al., 2023) but without a learned
detector, so the faithfulness numbers depend on nothing but the image:

1. Segment by color: a pixel is foreground if its HSV saturation and value are high enough; its color is
   the nearest named hue in `COLOR_HUES` (the background is black, so anti-aliasing and blur change a
   pixel's value but not its hue).
2. Connected components (8-connected) of same-color pixels; components smaller than `MIN_AREA` are specks.
3. Per object: coverage weights w = V / V_ref (V_ref: the component's 90th-percentile value) give a
   sub-pixel bounding box from the row and column profiles max w; its centre names the position (nearest
   `POSITIONS` anchor), its larger side the size (nearest `2 * SIZES`, on a log scale).
4. Shape: five descriptors from the complex moments c_pq = Σ w (x + iy)^p (x − iy)^q about the centre of
   mass (Abu-Mostafa & Psaltis, 1984), each free of scale and brightness: compactness, radial kurtosis and
   the 2-, 3- and 4-fold harmonics (the triangle's apex, the square's corners versus the diamond's);
   sums over all pixels, they average noise out. The nearest prototype names the shape; prototypes are
   measured once on the renderer's own shapes, sharp and blurred, so the detector follows `shapes.py`.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from carrara.data import shapes
from carrara.errors import CarraraError

ANALYSIS_SIDE = 64  # images are resized to this side first: the shapes' geometry is in fractions of the side
MIN_SATURATION = 0.35
MIN_VALUE = 0.2  # well above noise on black (σ = 10/255 → 5σ) and below any named color's value
MIN_AREA = 0.004  # of the image area: ~1/4 of the smallest small star; smaller components are specks
PROTOTYPE_BLURS = (0.0, 0.75, 1.5)  # Gaussian blur radii of the prototype renders
PROTOTYPES_PER_GROUP = 4  # renders per (shape, size, blur), at random sub-pixel positions and colors
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_COLOR_NAMES = tuple(shapes.COLOR_HUES)
_HUES = np.array([shapes.COLOR_HUES[c] for c in _COLOR_NAMES], dtype=np.float32)  # (K,) degrees


@dataclass(frozen=True)
class DetectedObject:
    shape: str
    color: str
    size: str
    position: str
    cx: float  # bounding-box centre, fraction of the side (x right, y down)
    cy: float
    extent: float  # larger bounding-box side, fraction of the side
    area: float  # covered fraction of the image
    features: tuple[float, ...]  # the shape descriptors of `_measure`


@dataclass(frozen=True)
class Detection:
    objects: tuple[DetectedObject, ...]  # largest first
    relation: str | None  # objects[0] <relation> objects[1], when there are at least two


def relation_between(a: DetectedObject, b: DetectedObject) -> str:
    """`a <relation> b` along the axis on which their centres differ most (the shapes captions' axes)."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _to_array(image) -> np.ndarray:
    """PIL image or (H, W, 3) uint8 array → (ANALYSIS_SIDE, ANALYSIS_SIDE, 3) float32 in [0, 1]."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise CarraraError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
        image = Image.fromarray(image, "RGB")
    elif not isinstance(image, Image.Image):
        raise CarraraError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (ANALYSIS_SIDE, ANALYSIS_SIDE):
        shrink = min(image.size) > ANALYSIS_SIDE
        image = image.resize((ANALYSIS_SIDE, ANALYSIS_SIDE),
                             Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255  # (S, S, 3)


def _hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB (S, S, 3) in [0, 1] → hue in degrees, saturation, value, each (S, S) (Smith, 1978)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    d = v - x.min(-1)
    s = np.where(v > 0, d / np.maximum(v, 1e-6), 0)
    d = np.maximum(d, 1e-6)
    h = np.where(v == r, ((g - b) / d) % 6, np.where(v == g, (b - r) / d + 2, (r - g) / d + 4)) * 60
    return h, s, v


def _label(classes: np.ndarray) -> np.ndarray:
    """8-connected components of equal non-negative `classes` (S, S) → labels (S, S), -1 for background.

    Min-label propagation with pointer jumping: every label is the flat index of a pixel of the same
    component, so following labels (lab[lab]) shortcuts long chains; converges in a few sweeps.
    """
    h, w = classes.shape
    fg = classes >= 0
    none = h * w  # the label of background; index `none` of `jump` points to itself
    lab = np.where(fg, np.arange(h * w).reshape(h, w), none)  # (S, S)
    padded = np.pad(classes, 1, constant_values=-1)
    same = [(dy, dx, fg & (padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == classes)) for dy, dx in _NEIGHBOURS]
    while True:
        padded_lab = np.pad(lab, 1, constant_values=none)
        new = lab
        for dy, dx, ok in same:
            new = np.where(ok, np.minimum(new, padded_lab[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]), new)
        jump = np.append(new.ravel(), none)
        for _ in range(4):
            jump = jump[jump]
        new = jump[:-1].reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(fg, lab, -1)


def _measure(w: np.ndarray, y0: int, x0: int) -> tuple[float, float, float, float, float, tuple[float, ...]]:
    """Coverage crop (h, w) at (y0, x0) → centre x, y, width, height, area (pixels) and the shape descriptors."""
    h, wd = w.shape
    area = float(w.sum())
    cols, rows = w.max(0), w.max(1)  # (w,), (h,): sub-pixel extents, exact for a straight anti-aliased edge
    width, height = float(cols.sum()), float(rows.sum())
    xs, ys = np.arange(wd) + 0.5, np.arange(h) + 0.5  # pixel centres
    cx, cy = float(cols @ xs / width), float(rows @ ys / height)
    mx, my = float(w.sum(0) @ xs / area), float(w.sum(1) @ ys / area)
    z = (xs[None, :] - mx) + 1j * (ys[:, None] - my)  # (h, w) offsets from the centre of mass
    r2 = (z * z.conjugate()).real
    c11, c22 = float((w * r2).sum()), float((w * r2 * r2).sum())
    c20, c30, c40 = ((w * z**k).sum() for k in (2, 3, 4))
    features = (c11 / area**2, c22 * area / c11**2, c20.real / c11, c30.imag / c11**1.5 * area**0.5,
                c40.real / c22)
    return x0 + cx, y0 + cy, width, height, area, features


def _components(x: np.ndarray) -> list[tuple[str, float, float, float, float, float, tuple[float, ...]]]:
    """(S, S, 3) image → per non-speck component: color, centre x, y, width, height (pixels), area, features."""
    hue, sat, val = _hsv(x)
    fg = (sat >= MIN_SATURATION) & (val >= MIN_VALUE)
    dist = np.abs((hue[..., None] - _HUES + 180) % 360 - 180)  # (S, S, K) circular hue distance
    classes = np.where(fg, dist.argmin(-1), -1)  # (S, S)
    labels = _label(classes)
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    min_pixels = MIN_AREA * labels.size
    found = []
    for i in ids[counts >= min_pixels]:
        ys, xs = np.nonzero(labels == i)
        v = val[ys, xs]
        w = np.zeros((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1), np.float32)  # (h, w) crop
        w[ys - ys.min(), xs - xs.min()] = np.minimum(v / np.percentile(v, 90), 1)
        measured = _measure(w, int(ys.min()), int(xs.min()))
        if measured[4] >= min_pixels:
            found.append((_COLOR_NAMES[classes[ys[0], xs[0]]], *measured))
    return found


@functools.cache
def _prototypes() -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Mean descriptors of rendered shapes per (shape, size, blur) and the pooled within-group spread."""
    rng = random.Random(0)
    names, means, variances = [], [], []
    for shape in shapes.SHAPES:
        for size, r in shapes.SIZES.items():
            for blur in PROTOTYPE_BLURS:
                feats = []
                for _ in range(PROTOTYPES_PER_GROUP):
                    obj = shapes.ShapeObject(shape, rng.choice(_COLOR_NAMES), size, "center",
                                             0.5 + rng.uniform(-0.1, 0.1), 0.5 + rng.uniform(-0.1, 0.1), r)
                    image = shapes.render(shapes.Scene((obj,)), ANALYSIS_SIDE)
                    if blur:
                        image = image.filter(ImageFilter.GaussianBlur(blur))
                    feats.append(max(_components(_to_array(image)), key=lambda c: c[5])[6])
                names.append(shape)
                means.append(np.mean(feats, 0))
                variances.append(np.var(feats, 0))
    scale = np.maximum(np.sqrt(np.mean(variances, 0)), 0.01)
    return tuple(names), np.array(means), scale


def classify_shape(features: tuple[float, ...]) -> str:
    """The shape whose prototype is nearest, each descriptor in units of its within-shape spread."""
    names, means, scale = _prototypes()
    return names[int((((np.asarray(features) - means) / scale) ** 2).sum(1).argmin())]


def detect(image) -> Detection:
    """Find the shapes in an RGB image (PIL or uint8 array, any size); objects largest first."""
    x = _to_array(image)
    side = float(ANALYSIS_SIDE)
    size_names = list(shapes.SIZES)
    log_extents = np.log([2 * shapes.SIZES[s] for s in size_names])
    objects = []
    for color, cx, cy, width, height, area, features in sorted(_components(x), key=lambda c: -c[5]):
        cx, cy, extent = cx / side, cy / side, max(width, height) / side
        position = min(shapes.POSITIONS, key=lambda p: math.dist((cx, cy), shapes.POSITIONS[p]))
        size = size_names[int(np.abs(log_extents - math.log(extent)).argmin())]
        objects.append(DetectedObject(classify_shape(features), color, size, position, cx, cy, extent,
                                      area / side**2, tuple(round(f, 4) for f in features)))
    relation = relation_between(objects[0], objects[1]) if len(objects) >= 2 else None
    return Detection(tuple(objects), relation)
