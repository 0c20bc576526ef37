"""Faithfulness on `shapes`: does the image show what the caption says? (object-focused, after GenEval).

Captions with known attributes come from `carrara.data.shapes`; the model draws them; the analytic
detector reads the images back. The same detector on the renderer's own images gives its ceiling, which
is reported beside the model's numbers. Each share carries its n and a Wilson 95 % interval.

Scoring an image against its caption's k objects (k = 1 or 2):
1. Candidates are the k largest detected objects; each caption object takes the candidate of its color.
   If exactly one caption object is left over, it takes the largest candidate left over (so its shape,
   size and position are judged even when its color is wrong); if both of two are left over, which is
   which is unknowable, and a caption object without a candidate is wrong on everything.
2. Per caption object: color, shape, size, and (one object only: two-object captions name no position)
   position. For two objects, these shares are over the 2n objects.
3. "relation": the two matched candidates stand in the caption's relation; "both objects": each caption
   color is among the candidates; "count": exactly k objects are detected; "all": everything above.
A blank image therefore scores 0 everywhere, and random blobs score chance, never by accident high.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from statistics import NormalDist

from tqdm import tqdm

from carrara.data import shapes
from carrara.diffusion.guidance import ClassifierGuidance
from carrara.diffusion.settings import DEFAULTS
from carrara.errors import CarraraError
from carrara.evaluate.detector import Detection, detect, relation_between
from carrara.families.pipeline import load_any
from carrara.fileio import write_json_atomic
from carrara.pipeline import load_classifier

OBJECT_ATTRIBUTES = {1: ("color", "shape", "size", "position"), 2: ("color", "shape", "size")}
SCENE_ATTRIBUTES = {1: ("count", "all"), 2: ("relation", "both objects", "count", "all")}


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial share (Wilson, 1927)."""
    z = NormalDist().inv_cdf((1 + confidence) / 2)  # 1.96 for 95 %
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def sample_prompts(n: int, objects: int = 1, seed: int = 0) -> list[tuple[shapes.Scene, str]]:
    """n scenes with one object, or two with a relation, and their captions; deterministic by seed."""
    if objects not in (1, 2):
        raise CarraraError(f"objects must be 1 or 2, got {objects}")
    if n < 1:
        raise CarraraError(f"n must be at least 1, got {n}")
    rng = random.Random(seed)
    templates = shapes.SINGLE_TEMPLATES if objects == 1 else shapes.PAIR_TEMPLATES
    prompts = []
    for _ in range(n):
        scene = shapes.sample_attributes(rng, two_object_fraction=float(objects == 2))
        prompts.append((scene, shapes.caption(scene, rng.randrange(len(templates)))))
    return prompts


def score(scene: shapes.Scene, detection: Detection) -> dict[str, list[bool]]:
    """Per attribute, whether each caption object (or the scene) came out right; see the module docstring."""
    k = len(scene.objects)
    candidates = list(detection.objects[:k])  # largest first
    free, matched = list(range(len(candidates))), [None] * k
    for j, o in enumerate(scene.objects):  # 1. by color
        i = next((i for i in free if candidates[i].color == o.color), None)
        if i is not None:
            free.remove(i)
            matched[j] = candidates[i]
    if matched.count(None) == 1 and free:  # 2. one caption object left over: it takes the largest candidate left
        matched[matched.index(None)] = candidates[free[0]]
    result = {a: [m is not None and getattr(m, a) == getattr(o, a) for o, m in zip(scene.objects, matched)]
              for a in OBJECT_ATTRIBUTES[k]}
    if k == 2:
        a, b = matched
        result["relation"] = [a is not None and b is not None and relation_between(a, b) == scene.relation]
        result["both objects"] = [all(any(c.color == o.color for c in candidates) for o in scene.objects)]
    result["count"] = [len(detection.objects) == k]
    result["all"] = [all(all(v) for v in result.values())]
    return result


def _summarize(outcomes: list[dict[str, list[bool]]], objects: int) -> dict[str, dict]:
    summary = {}
    for attribute in OBJECT_ATTRIBUTES[objects] + SCENE_ATTRIBUTES[objects]:
        values = [v for o in outcomes for v in o[attribute]]
        correct, n = sum(values), len(values)
        lo, hi = wilson_interval(correct, n)
        summary[attribute] = {"accuracy": correct / n, "correct": correct, "n": n, "ci95": [round(lo, 4), round(hi, 4)]}
    return summary


class ClassifierGuided:
    """`pipe` with classifier guidance (Dhariwal & Nichol 2021, `diffusion/guidance.py`) of scale s toward each
    caption's own ground truth: the classes `NoiseAwareClassifier.scene_classes` gives its scene (one object: shape,
    colour, size, position; two: both objects' relations and shapes). `classes` maps each caption to them (`caption_classes`);
    the caption itself is drawn at the caller's w, or with `conditional=False` the empty prompt (the unconditional
    model, as the paper guides it)."""

    def __init__(self, pipe: Callable, classifier, scale: float, classes: dict[str, dict], *,
                 conditional: bool = True):
        self.pipe, self.classifier, self.scale, self.classes = pipe, classifier, scale, classes
        self.conditional = conditional

    def __call__(self, prompts: list[str], **settings):
        guide = None
        if self.scale:
            wanted = [self.classes[p] for p in prompts]
            guide = ClassifierGuidance(lambda x, t: self.classifier.log_prob_each(x, t, wanted), self.scale)
        return self.pipe(prompts if self.conditional else [""] * len(prompts), classifier=guide, **settings)


def caption_classes(classifier, prompts: list[tuple[shapes.Scene, str]]) -> dict[str, dict]:
    """caption → the classifier's classes of its scene, for `sample_prompts`' (scene, caption) pairs."""
    return {text: classifier.scene_classes(shapes.scene_metadata(scene, 1)["objects"], scene.relation)
            for scene, text in prompts}


def evaluate_faithfulness(pipe: Callable, *, n: int = 200, objects: int = 1, steps: int = DEFAULTS.steps,
                          sampler: str = DEFAULTS.sampler, guidance: float = DEFAULTS.guidance, seed: int = 0,
                          batch_size: int = 16, progress: bool = True) -> dict:
    """Generate n captioned scenes with `pipe` and score what the detector reads back, per attribute."""
    if batch_size < 1:
        raise CarraraError(f"batch_size must be at least 1, got {batch_size}")
    prompts = sample_prompts(n, objects, seed)
    started, outcomes = time.perf_counter(), []
    with tqdm(total=n, desc=f"faithfulness ({objects} object{'s' * (objects > 1)})", unit="img",
              disable=not progress, leave=False) as bar:
        for start in range(0, n, batch_size):
            batch = prompts[start:start + batch_size]
            # image i of a batch uses seed + i, so image j of the whole run uses seed + j
            images = pipe([text for _, text in batch], steps=steps, sampler=sampler, guidance=guidance,
                          seed=seed + start)
            if len(images) != len(batch):
                raise CarraraError(f"the pipeline returned {len(images)} images for {len(batch)} prompts")
            outcomes += [score(scene, detect(image)) for (scene, _), image in zip(batch, images)]
            bar.update(len(batch))
    return {"objects": objects, "n": n, "steps": steps, "sampler": sampler, "guidance": guidance, "seed": seed,
            "attributes": _summarize(outcomes, objects), "seconds": round(time.perf_counter() - started, 2)}


def detector_ceiling(n: int = 200, objects: int = 1, seed: int = 0, *, size: int = 64) -> dict:
    """The detector's own accuracy: the same captions, drawn by the `shapes` renderer instead of a model."""
    prompts = sample_prompts(n, objects, seed)
    outcomes = [score(scene, detect(shapes.render(scene, size))) for scene, _ in prompts]
    return {"objects": objects, "n": n, "seed": seed, "size": size, "attributes": _summarize(outcomes, objects)}


def faithfulness_report(model_path, n: int = 200, guidance: float = DEFAULTS.guidance, *, steps: int = DEFAULTS.steps,
                        sampler: str = DEFAULTS.sampler, seed: int = 0, batch_size: int = 16, out=None,
                        classifier: str | None = None, classifier_scale: float = 1.0,
                        progress: bool = True, allow_pickle: bool = False, precision: str = "auto") -> dict:
    """Load a model, evaluate one- and two-object captions beside the detector's ceiling; write JSON to `out`.
    With `classifier` (a `carrara train classifier` run), every image is also guided toward its caption's ground
    truth with scale `classifier_scale` (`ClassifierGuided`)."""
    if n < 1:
        raise CarraraError(f"--n must be at least 1, got {n}")
    pipe = load_any(model_path, allow_pickle=allow_pickle, precision=precision)
    report = {"model": str(model_path), "model_hash": pipe.model_hash, "precision": getattr(pipe, "precision", "fp32"),
              "n": n, "guidance": guidance, "steps": steps,
              "sampler": sampler, "seed": seed,
              "detector": "analytic color/shape detector (carrara.evaluate.detector); ceiling = same captions, "
                          "rendered by carrara.data.shapes"}
    guide = None
    if classifier is not None:
        if not hasattr(pipe, "schedule"):
            raise CarraraError(f"--classifier guides a diffusion model; {model_path} is a {pipe.kind} model")
        guide = load_classifier(classifier, pipe.schedule)
        report["classifier"] = {"run": str(Path(classifier).resolve()), "scale": classifier_scale,
                                "classes": "each caption's own: one object's attributes, two objects' relations and shapes"}
    for objects, key in ((1, "one_object"), (2, "two_objects")):
        fn = pipe if guide is None else ClassifierGuided(pipe, guide, classifier_scale,
                                                         caption_classes(guide, sample_prompts(n, objects, seed)))
        model = evaluate_faithfulness(fn, n=n, objects=objects, steps=steps, sampler=sampler, guidance=guidance,
                                      seed=seed, batch_size=batch_size, progress=progress)
        ceiling = detector_ceiling(n, objects, seed)
        report[key] = {"model": model["attributes"], "ceiling": ceiling["attributes"], "seconds": model["seconds"]}
    if out is not None:
        write_json_atomic(out, report)
    return report


def format_report(report: dict) -> str:
    """A short table: per attribute, the model's share with its 95 % interval and the detector's ceiling."""
    title = (f"faithfulness on shapes: {report['model']} (n={report['n']} per set, guidance {report['guidance']}, "
             f"{report['steps']} {report['sampler']} steps, seed {report['seed']}, {report.get('precision', 'fp32')})")
    if "classifier" in report:
        title += f"\nclassifier guidance s={report['classifier']['scale']:g} with {report['classifier']['run']}"
    lines = [title, f"{'':14s}{'model':>22s}{'ceiling':>9s}"]
    for key, title in (("one_object", "1 object"), ("two_objects", "2 objects")):
        lines.append(title)
        for attribute, m in report[key]["model"].items():
            lo, hi = m["ci95"]
            ceiling = report[key]["ceiling"][attribute]["accuracy"]
            lines.append(f"  {attribute:12s}{100 * m['accuracy']:7.1f}% [{100 * lo:5.1f}, {100 * hi:5.1f}]"
                         f"{100 * ceiling:8.1f}%")
    return "\n".join(lines)
