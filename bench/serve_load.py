"""Load test of a running `carrara serve`: N clients for D seconds on loopback; throughput, latency, errors, RSS.

    carrara serve --model RUN --data-dir /tmp/gallery &
    python bench/serve_load.py --url http://127.0.0.1:7860 [--clients 16] [--duration 60] [--steps 4]

Each client loops until the deadline: POST /api/generate (a random seed, `--steps` steps), poll GET /api/jobs/{id}
every 0.2 s until it finishes, GET its image, GET /api/gallery?limit=20. Every HTTP request's latency counts; a 429
(queue full) is counted apart from errors and the client waits Retry-After. One warm-up job runs before the server's
RSS is first read. Writes bench/results/serve_load.json; exits 1 on any error or RSS growth over --rss-bound-mb.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import threading
import time
from collections import defaultdict
from urllib.parse import urlsplit

import httpx
import numpy as np

from carrara.fileio import ensure_dir, write_json_atomic
from carrara.serve.app import is_loopback

PROMPTS = ["a happy kitty", "red heart", "a red sports car", "a snowman in the snow"]


class Stats:
    """Latencies per endpoint, errors and 429s, shared by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latency_ms: dict[str, list[float]] = defaultdict(list)
        self.job_seconds: list[float] = []
        self.errors: list[str] = []
        self.rejected = 0

    def request(self, http: httpx.Client, method: str, path: str, kind: str, **kwargs) -> httpx.Response | None:
        """One timed request; None (and an error counted) when it fails or answers 4xx/5xx other than 429."""
        start = time.perf_counter()
        try:
            r = http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            with self.lock:
                self.errors.append(f"{kind}: {type(e).__name__}: {e}")
            return None
        with self.lock:
            self.latency_ms[kind].append(1000 * (time.perf_counter() - start))
            if r.status_code == 429:
                self.rejected += 1
            elif r.status_code >= 400:
                self.errors.append(f"{kind}: HTTP {r.status_code}: {r.text[:200]}")
                return None
        return r


def client(url: str, deadline: float, steps: int, stats: Stats, rng: random.Random) -> None:
    """Generate, watch, fetch, list: again and again until the deadline."""
    with httpx.Client(base_url=url, timeout=60) as http:
        while time.monotonic() < deadline:
            body = {"prompt": rng.choice(PROMPTS), "steps": steps, "seed": "random"}
            start = time.monotonic()
            r = stats.request(http, "POST", "/api/generate", "generate", json=body)
            if r is None:
                time.sleep(0.2)
                continue
            if r.status_code == 429:
                time.sleep(min(float(r.headers.get("Retry-After", 1)), max(0.0, deadline - time.monotonic())))
                continue
            job = r.json()
            while job["status"] in ("queued", "running") and time.monotonic() < deadline + 120:
                time.sleep(0.2)
                r = stats.request(http, "GET", f"/api/jobs/{job['id']}", "job")
                if r is None:
                    break
                job = r.json()
            if job["status"] != "done":
                with stats.lock:
                    stats.errors.append(f"job {job['id']} ended {job['status']}: {job.get('error')}")
                continue
            with stats.lock:
                stats.job_seconds.append(time.monotonic() - start)
            stats.request(http, "GET", job["images"][0]["url"], "image")
            stats.request(http, "GET", "/api/gallery?limit=20", "gallery")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"n": len(values), "p50": round(p50, 2), "p95": round(p95, 2), "p99": round(p99, 2),
            "max": round(max(values), 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:7860", help="a running carrara serve (loopback only)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0, help="seconds")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per job")
    p.add_argument("--rss-bound-mb", type=float, default=200.0, help="allowed RSS growth over the run")
    p.add_argument("--out", default="bench/results/serve_load.json")
    args = p.parse_args()
    host = urlsplit(args.url).hostname or ""
    if not is_loopback(host):
        sys.exit(f"serve_load: {args.url} is not a loopback address; this load test only targets this machine")
    with httpx.Client(base_url=args.url, timeout=120) as http:
        model = http.get("/api/model").json()
        warm = http.post("/api/generate", json={"prompt": PROMPTS[0], "steps": args.steps}).json()
        while http.get(f"/api/jobs/{warm['id']}").json()["status"] in ("queued", "running"):
            time.sleep(0.2)
        rss_start = http.get("/api/health").json()["rss_mb"]
    stats = Stats()
    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(args.url, start + args.duration, args.steps, stats,
                                                     random.Random(k))) for k in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    with httpx.Client(base_url=args.url, timeout=30) as http:
        health = http.get("/api/health").json()
    all_ms = [ms for values in stats.latency_ms.values() for ms in values]
    growth = health["rss_mb"] - rss_start
    result = {"benchmark": "serve_load", "url": args.url, "clients": args.clients, "duration_s": round(elapsed, 2),
              "steps": args.steps, "model": {k: model[k] for k in ("name", "model_hash", "image_size")},
              "requests": len(all_ms), "requests_per_s": round(len(all_ms) / elapsed, 2),
              "latency_ms": percentiles(all_ms), "latency_ms_by_endpoint": {k: percentiles(v) for k, v in
                                                                             sorted(stats.latency_ms.items())},
              "errors": len(stats.errors), "error_examples": stats.errors[:5], "rejected_429": stats.rejected,
              "jobs_done": len(stats.job_seconds), "images_per_s": round(len(stats.job_seconds) / elapsed, 3),
              "job_seconds": percentiles(stats.job_seconds), "rss_mb_start": rss_start, "rss_mb_end": health["rss_mb"],
              "rss_growth_mb": round(growth, 1), "rss_bound_mb": args.rss_bound_mb,
              "rss_ok": growth <= args.rss_bound_mb, "server_jobs": health["jobs"], "cores": os.cpu_count(),
              "python": platform.python_version()}
    ensure_dir(os.path.dirname(args.out) or ".")
    write_json_atomic(args.out, result)
    lat = result["latency_ms"]
    print(f"serve_load: {result['requests']} requests in {elapsed:.1f} s ({result['requests_per_s']}/s), latency "
          f"p50 {lat.get('p50')} p95 {lat.get('p95')} p99 {lat.get('p99')} ms, {result['errors']} errors, "
          f"{stats.rejected} × 429, {result['jobs_done']} jobs, RSS {rss_start:.0f} → {health['rss_mb']:.0f} MB "
          f"→ {args.out}")
    return 0 if result["errors"] == 0 and result["rss_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
