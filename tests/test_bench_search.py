"""bench/search.py (issue 20's < 100 ms search bar) on tiny data: every row it reports, and its one-line errors."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import search as bench_search


def test_tiny_bench_times_both_kinds_and_finds_each_image_first(tmp_path, capsys):
    assert bench_search.main(["--tiny", "--quiet", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "search.json").read_text())
    assert r["tiny"] and r["images"] == 24 and r["dim"] == 32 and r["index_build_s"] is not None
    for kind in ("text", "image"):
        s = r[kind]
        assert s["n"] == 4 and 0 < s["median_knn_ms"] <= s["median_ms"] <= s["max_ms"] and s["median_repeat_ms"] > 0
        assert s["under_target"] == (s["max_ms"] < 100)
        assert len({q["query"] for q in r["queries"][kind]}) == 4  # distinct queries
    assert r["image_own_file_first"] == 1.0  # an image's own embedding is its nearest: cosine 1
    assert r["cpu"]["kind"] in ("avx512_bf16", "avx2-only", "other")
    out = capsys.readouterr().out
    assert "text queries: median" in out and "image queries: median" in out
    again = tmp_path / "again.json"  # the index is built once and loaded after
    assert bench_search.main(["--tiny", "--quiet", "--out", str(tmp_path), "--json", str(again)]) == 0
    assert json.loads(again.read_text())["index_build_s"] is None


def test_missing_inputs_are_one_error_line(tmp_path, capsys):
    assert bench_search.main(["--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give --data DIR and --clip CLIP_RUN" in err[0]
    assert bench_search.main(["--data", str(tmp_path), "--clip", str(tmp_path / "absent"),
                              "--json", str(tmp_path / "x.json")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "x.json").exists()
