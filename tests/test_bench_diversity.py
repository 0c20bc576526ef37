"""bench/diversity.py: k samples per prompt per model, one number per model with its interval, cached per model."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import diversity as bench
import v2_ablations


def test_a_model_blind_to_its_noise_scores_zero_and_a_trained_one_more(tiny_diffusion_run, tiny_clip_run, tmp_path,
                                                                       monkeypatch, capsys):
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    argv = ["--models", f"tiny={tiny_diffusion_run}", "--clip", str(tiny_clip_run[0]), "--prompts",
            str(tmp_path / "p.txt"), "--k", "3", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "d.json")]
    result = bench.run(bench.parse_args(argv))
    row = result["models"]["tiny"]
    assert len(row["per_prompt"]) == 2 and row["value"] > 0 and row["ci95"][0] <= row["value"] <= row["ci95"][1]
    assert json.loads((tmp_path / "d.json").read_text())["models"]["tiny"]["value"] == row["value"]
    assert (tmp_path / "out" / "eval" / "tiny" / "diversity.png").is_file()

    # every seed drawing the same noise (`same_noise`): the same image k times, diversity 0 (fresh cache: new name)
    monkeypatch.setattr(v2_ablations, "samples_per_prompt", lambda pipe, prompts, k: [
        pipe([p] * k, seed=0, size=pipe.sizes[0], same_noise=True) for p in prompts])
    argv[1] = f"blind={tiny_diffusion_run}"
    blind = bench.run(bench.parse_args(argv))["models"]["blind"]
    assert blind["value"] == pytest.approx(0, abs=1e-6)


def test_bad_arguments_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="NAME=MODEL pairs"):
        bench.main(["--models", "nothing", "--clip", str(tmp_path)])
    with pytest.raises(SystemExit, match="at least 2"):
        bench.main(["--models", "a=default", "--clip", str(tmp_path), "--k", "1"])


@pytest.mark.skipif(not Path("/usr/share/unicode/emoji/emoji-test.txt").is_file(), reason="unicode-data missing")
def test_groups_add_group_precision_against_the_nearest_real_emoji(tiny_diffusion_run, tiny_clip_run, tiny_shapes,
                                                                   tmp_path):
    """Four real 'emoji' (tiny shapes images labelled 🐈 🐕 🍓 🇫🇷): a request accepting the two mammals has chance
    1/2, one accepting the flag 1/4; each precision is a share of k samples."""
    data = tmp_path / "data"
    data.mkdir()
    records = [json.loads(s) for s in (tiny_shapes / "metadata.jsonl").read_text().splitlines()[:4]]
    for record, emoji in zip(records, ["🐈", "🐕", "🍓", "🇫🇷"]):
        (data / record["file_name"]).write_bytes((tiny_shapes / record["file_name"]).read_bytes())
        record["emoji"] = emoji
    (data / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    (tmp_path / "g.tsv").write_text("# requests\nsome animal\tanimal-mammal\na national flag\tcountry-flag\n")
    argv = ["--models", f"tiny={tiny_diffusion_run}", "--clip", str(tiny_clip_run[0]), "--groups",
            str(tmp_path / "g.tsv"), "--data", str(data), "--k", "4", "--out", str(tmp_path / "out")]
    g = bench.run(bench.parse_args(argv))["models"]["tiny"]["group_precision"]
    assert g["chance"] == pytest.approx((1 / 2 + 1 / 4) / 2) and g["k"] == 4
    assert all(p in (0, 0.25, 0.5, 0.75, 1) for p in g["per_prompt"]) and len(g["per_prompt"]) == 2
    assert g["value"] == pytest.approx(sum(g["per_prompt"]) / 2)
    again = bench.run(bench.parse_args(argv))["models"]["tiny"]["group_precision"]  # from the caches
    assert again == g and (tmp_path / "out" / "real-embeds.pt").is_file()
    with pytest.raises(SystemExit, match="--groups needs --data"):
        bench.main([a for a in argv if a not in ("--data", str(data))])
    (tmp_path / "bad.tsv").write_text("some animal\n")
    with pytest.raises(SystemExit, match="is not 'request<TAB>subgroup,subgroup'"):
        bench.main(["--models", "a=default", "--clip", "x", "--groups", str(tmp_path / "bad.tsv"), "--data", "d"])
