"""report.html for `carrara eval`: the settings, every number with its interval and counts, a sample grid."""
from __future__ import annotations

from html import escape
from pathlib import Path

from carrara.fileio import write_text_atomic

STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:60em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}img{image-rendering:pixelated}"""


def _row(*cells: str, header: bool = False) -> str:
    tag = "th" if header else "td"
    return "<tr>" + "".join(f"<{tag}{' class=num' if c[:1].isdigit() else ''}>{c}</{tag}>" for c in cells) + "</tr>"


def write_report_html(path: str | Path, report: dict, samples: str | None = None) -> None:
    """Write a self-contained page (no scripts, no network) next to metrics.json."""
    s = report["settings"]
    parts = [f"<!doctype html><meta charset=utf-8><title>carrara eval: {escape(s['model'])}</title>",
             f"<style>{STYLE}</style><h1>carrara eval</h1>",
             (f"<p>model <code>{escape(s['model'])}</code> (U-Net hash {escape(report['model_hash'])}), "
             f"{s['steps']} {escape(s['sampler'])} steps, guidance {s['guidance']}, seed {s['seed']}, "
             f"data <code>{escape(str(s['data']))}</code>; {report['seconds']} s.</p>"), "<table>",
             _row("metric", "value", "95 % interval", "samples", header=True)]
    for name, m in report["metrics"].items():
        if "value" not in m:
            continue
        if "ci95" in m:
            interval = f"{m['ci95'][0]:.4g} – {m['ci95'][1]:.4g}"
        else:
            interval = f"± {m['std_over_subsets']:.2g} (std over subsets)"
        counts = ", ".join(f"{k} {m[k]}" for k in ("n", "n_gen", "n_real") if k in m)
        parts.append(_row(escape(name), f"{m['value']:.4g}", interval, counts))
    parts.append("</table>")
    for name, m in report["metrics"].items():
        if "model" not in m:
            continue
        parts += [f"<h2>{escape(name)}</h2><table>", _row("attribute", "model", "95 % interval", "detector ceiling",
                                                          header=True)]
        for attribute, v in m["model"].items():
            lo, hi = v["ci95"]
            parts.append(_row(escape(attribute), f"{100 * v['accuracy']:.1f} %", f"{100 * lo:.1f} – {100 * hi:.1f} %",
                              f"{100 * m['ceiling'][attribute]['accuracy']:.1f} %"))
        parts.append("</table>")
    if samples:
        parts.append(f"<h2>Samples</h2><p>The first 64 generated images (PNG, lossless).</p>"
                     f"<img src='{escape(samples)}' alt='generated samples' width=540>")
    write_text_atomic(path, "\n".join(parts) + "\n")
