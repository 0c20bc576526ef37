"""Two experiments of the papers, on carrara's own models (issue "Evaluation", part 5).

guidance: classifier-free guidance trade-off (GLIDE, Imagen Fig. A.11, LDM Fig. 14): w ∈ {1, 1.5, 2, 3, 5, 8}
          → FD (fidelity/diversity) against CLIP score (text alignment).
steps:    quality vs sampling steps (DDIM paper, Table 1): DDPM at 1000/250/50 steps, DDIM at 10/20/50/100,
          DPM-Solver++(2M) at 10/20 → FD.

    python experiments/sweep.py guidance --model RUN --data DIR --clip CLIP_RUN --n 500 --out docs/results/guidance
    python experiments/sweep.py steps    --model RUN --data DIR --clip CLIP_RUN --n 500 --out docs/results/steps

Each setting is one `carrara eval` (same captions and seeds for every setting); results.json gathers them and
a figure is drawn. Every setting's own report folder is kept beside it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GUIDANCE = (1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
STEPS = (("ddpm", 1000), ("ddpm", 250), ("ddpm", 50), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100),
         ("dpmpp", 10), ("dpmpp", 20))


def _value(report: dict, prefix: str, suffix: str = "") -> tuple[float, list[float]]:
    (key,) = [k for k in report["metrics"] if k.startswith(prefix) and k.endswith(suffix)]
    return report["metrics"][key]["value"], report["metrics"][key]["ci95"]


def main(argv: list[str] | None = None) -> int:
    from carrara.errors import CarraraError
    from carrara.evaluate.suite import EvalSettings, run_eval
    from carrara.fileio import write_json_atomic

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=["guidance", "steps"])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--clip", required=True)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--guidance", type=float, default=4.0, help="for the steps experiment")
    p.add_argument("--skip", default="", help="comma list of settings to leave out, e.g. ddpm-1000")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    skip = set(filter(None, args.skip.split(",")))
    if args.experiment == "guidance":
        settings = [(f"w{w:g}", {"guidance": w}) for w in GUIDANCE]
    else:
        settings = [(f"{s}-{k}", {"sampler": s, "steps": k, "guidance": args.guidance}) for s, k in STEPS]
    rows = []
    try:
        for name, kw in settings:
            if name in skip:
                continue
            folder = out / name
            if (folder / "metrics.json").is_file():  # resumable: finished settings are kept
                report = json.loads((folder / "metrics.json").read_text())
            else:
                s = EvalSettings(model=args.model, data=args.data, clip=args.clip, n=args.n,
                                 metrics=("fd", "clipscore"), **kw)
                report = run_eval(s, folder)
            fd, fd_ci = _value(report, "FD[")
            cs, cs_ci = _value(report, "CLIPScore[", "generated]")
            rows.append({"setting": name, **kw, "fd": fd, "fd_ci95": fd_ci, "clip_score": cs, "clip_score_ci95": cs_ci,
                         "seconds": report["seconds"]})
            print(f"{name}: FD {fd:.4g} [{fd_ci[0]:.4g}, {fd_ci[1]:.4g}], CLIP score {cs:.2f}", flush=True)
    except CarraraError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(out / "results.json", {"experiment": args.experiment, "model": args.model, "n": args.n,
                                             "rows": rows})
    _plot(args.experiment, rows, out / f"{args.experiment}.png")
    print(f"wrote {out / 'results.json'} and {out / (args.experiment + '.png')}")
    return 0


def _err(rows: list[dict], key: str) -> list[list[float]]:
    """Asymmetric error bars (2, N) from each row's 95 % bootstrap interval."""
    return [[max(r[key] - r[f"{key}_ci95"][0], 0) for r in rows], [max(r[f"{key}_ci95"][1] - r[key], 0) for r in rows]]


def _plot(experiment: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    if experiment == "guidance":
        ax.errorbar([r["clip_score"] for r in rows], [r["fd"] for r in rows], fmt="o-", capsize=3,
                    xerr=_err(rows, "clip_score"), yerr=_err(rows, "fd"))
        for r in rows:
            ax.annotate(f"w={r['guidance']:g}", (r["clip_score"], r["fd"]), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("CLIP score (higher: closer to the text)")
        ax.set_ylabel("FD_clip (lower: closer to the data)")
        ax.set_title("classifier-free guidance trade-off")
    else:
        for sampler in dict.fromkeys(r["sampler"] for r in rows):
            rs = [r for r in rows if r["sampler"] == sampler]
            ax.errorbar([r["steps"] for r in rs], [r["fd"] for r in rs], yerr=_err(rs, "fd"), fmt="o-", capsize=3,
                        label=sampler)
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_ylabel("FD_clip")
        ax.legend()
        ax.set_title("quality vs sampling steps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
