"""Issue 20's speed bar for CLIP retrieval: `carrara search` answers in < 100 ms once the index is loaded.

Loads (or first builds, with `carrara index`'s code) the index of a dataset, warms the text tower up as `carrara
search` does, then times `--queries` distinct text queries (the first lines of carrara/data/emoji_paraphrases.txt, or
the data's own captions when there are fewer) and as many image queries (data images, each a file on disk, as a user
passes one), each `--rounds` times; per kind the median and max over queries of a query's first run (a new query:
the text encoder caches prompts it has seen), the median of repeats, and the part that is the kNN itself. Image
queries also check the index: a data image's own file should come first.

    python bench/search.py --data runs/emoji/data --clip runs/clip-emoji [--index runs/emoji-index.safetensors]
        [--queries 20] [--rounds 3] [--json bench/results/search-<cpu kind>.json]
    python bench/search.py --tiny      # seconds, on tiny data and an untrained tiny CLIP: checks the bench
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from families import cpu_kind

from carrara.errors import CarraraError
from carrara.evaluate.retrieval import ClipIndex, embed_query, search
from carrara.fileio import write_json_atomic
from carrara.models.clip import ClipScorer

ROOT = Path(__file__).resolve().parent.parent
PARAPHRASES = ROOT / "carrara" / "data" / "emoji_paraphrases.txt"
TARGET_MS = 100.0


def text_queries(index: ClipIndex, n: int) -> list[str]:
    """n distinct text queries: hand-written paraphrases (their captions are the part before a tab, if any), then the
    index's own captions."""
    lines = [line.split("\t")[-1].strip() for line in PARAPHRASES.read_text(encoding="utf-8").splitlines()]
    found = list(dict.fromkeys(q for q in [*lines, *index.texts] if q and not q.startswith("#")))
    return found[:n]


def time_queries(index: ClipIndex, scorer: ClipScorer, queries: list[str], rounds: int) -> list[dict]:
    """Per query: its first run (`ms`: what a new query costs; the text encoder caches a prompt's states, so a
    repeated text query is cheaper) and the median of all `rounds` runs (`ms_repeat`)."""
    rows = []
    for q in queries:
        runs = [search(index, scorer, q, k=8) for _ in range(rounds)]
        rows.append({"query": q, "ms": runs[0]["ms"], "ms_repeat": statistics.median(r["ms"] for r in runs),
                     "ms_knn": statistics.median(r["ms_knn"] for r in runs), "first": runs[0]["hits"][0]["file"]})
    return rows


def summary(rows: list[dict]) -> dict:
    ms = [r["ms"] for r in rows]
    return {"n": len(rows), "median_ms": statistics.median(ms), "max_ms": max(ms),
            "median_repeat_ms": statistics.median(r["ms_repeat"] for r in rows),
            "median_knn_ms": statistics.median(r["ms_knn"] for r in rows), "under_target": max(ms) < TARGET_MS}


def run(args) -> dict:
    if args.tiny:
        from carrara.data.shapes import build_shapes
        from carrara.models.clip import ClipConfig, ClipModel

        tmp = Path(args.out or tempfile.mkdtemp(prefix="search-tiny-"))
        if not (tmp / "data" / "metadata.jsonl").is_file():  # a rerun in the same folder reuses data, CLIP, index
            build_shapes(tmp / "data", n=24, size=16, seed=0, progress=False)
            torch.manual_seed(0)
            ClipModel(ClipConfig(image_size=16, channels=(8, 16), embed_dim=32, groups=4)).save_pretrained(
                tmp / "clip" / "clip")
        args.data, args.clip = str(tmp / "data"), str(tmp / "clip")
        args.index = args.index or str(tmp / "index.safetensors")
        args.json = args.json or str(tmp / "search.json")
    if not args.data or not args.clip:
        raise CarraraError("give --data DIR and --clip CLIP_RUN (or --tiny)")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    scorer = ClipScorer.load(args.clip)
    index_path = Path(args.index or Path(args.data).with_name(Path(args.data).name + "-index.safetensors"))
    built_s = None
    if not index_path.is_file():
        t = time.perf_counter()
        ClipIndex.build(args.data, scorer, args.clip, progress=not args.quiet).save(index_path)
        built_s = time.perf_counter() - t
    t = time.perf_counter()
    index = ClipIndex.load(index_path)
    index.check_clip(scorer)
    embed_query(scorer, "warm-up")
    load_s = time.perf_counter() - t
    n = args.queries or (4 if args.tiny else 20)
    rounds = args.rounds or (1 if args.tiny else 3)
    texts = time_queries(index, scorer, text_queries(index, n), rounds)
    files = index.files[:: max(1, len(index.files) // n)][:n]
    images = time_queries(index, scorer, [str(index.root / f) for f in files], rounds)
    own_first = sum(r["first"] == f for r, f in zip(images, files)) / len(files)
    result = {"what": "carrara search latency after the index loads (issue 20: < 100 ms)", "cpu": cpu_kind(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tiny": bool(args.tiny),
              "data": args.data, "clip": args.clip, "index": str(index_path), "images": len(index.files),
              "dim": int(index.embeddings.shape[1]), "backend": type(index.index).__name__, "rounds": rounds,
              "index_build_s": built_s, "load_s": load_s, "text": summary(texts), "image": summary(images),
              "image_own_file_first": own_first, "queries": {"text": texts, "image": images}}
    write_json_atomic(args.json, result)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="the dataset folder the index covers (carrara data build …)")
    p.add_argument("--clip", help="the `carrara train clip` run the index is made with")
    p.add_argument("--index", help="the index file (default DATA-index.safetensors beside DATA; built if missing)")
    p.add_argument("--queries", type=int, help="distinct queries per kind (default 20, tiny 4)")
    p.add_argument("--rounds", type=int, help="times each query is run, median (default 3, tiny 1)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    p.add_argument("--out", help="--tiny's folder (default a new temporary one)")
    p.add_argument("--json", help="results (default bench/results/search-<cpu kind>.json; tiny OUT/search.json)")
    p.add_argument("--tiny", action="store_true", help="tiny data and an untrained CLIP: checks the bench")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.tiny and not args.json:
        args.json = str(ROOT / "bench" / "results" / f"search-{cpu_kind()['kind']}.json")
    try:
        r = run(args)
    except CarraraError as e:
        print(f"bench/search.py: error: {e}", file=sys.stderr)
        return 2
    for kind in ("text", "image"):
        s = r[kind]
        print(f"{kind} queries: median {s['median_ms']:.1f} ms, max {s['max_ms']:.1f} ms (repeated "
              f"{s['median_repeat_ms']:.1f} ms; kNN {s['median_knn_ms']:.2f} ms) over {s['n']} distinct queries × "
              f"{r['rounds']} rounds")
    print(f"{r['images']} images, {r['dim']}-d, {r['backend']}; index loaded in {r['load_s']:.2f} s"
          + (f", built in {r['index_build_s']:.0f} s" if r["index_build_s"] else "")
          + f"; own file first for {r['image_own_file_first']:.0%} of image queries; {r['cpu']['kind']} "
          f"({r['cpu']['model']}, {r['cpu']['threads']} threads); wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
