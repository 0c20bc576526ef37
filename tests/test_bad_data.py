"""Bad data never crashes a run: every kind is skipped, counted by reason, and reported at the end and in log.txt."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from carrara.cli import main

TINY_AE = json.dumps({"block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4,
                      "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2})
SAMPLE_REASONS = {"empty file": 1, "corrupt image": 1, "not an image": 1, "missing file": 1, "missing caption": 1,
                  "empty caption": 1, "image too small": 1, "aspect ratio over 2:1": 1, "bad metadata line": 1}
CONVERTED = {"P": 1, "RGBA": 1, "L": 1, "CMYK": 1, "I;16": 1}


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def good(i: int) -> bytes:
    rng = np.random.default_rng(i)
    return encode(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))


TRUNCATED = good(99)[:200]
MODES = {"palette.png": encode(Image.new("P", (16, 16), 3)), "rgba.png": encode(Image.new("RGBA", (16, 16), (1, 2, 3, 4))),
         "gray.png": encode(Image.new("L", (16, 16), 7)), "cmyk.jpg": encode(Image.new("CMYK", (16, 16)), "JPEG"),
         "deep.png": encode(Image.fromarray(np.full((16, 16), 4000, dtype=np.uint16)))}
TOO_SMALL, TOO_WIDE = encode(Image.new("RGB", (4, 4))), encode(Image.new("RGB", (48, 16)))


def run_report(data: str, out, capsys) -> tuple[int, str, str]:
    code = main(["train", "autoencoder", "--data", data, "--out", str(out), "--size", "16", "--steps", "2",
                 "--batch-size", "8", "--quiet", "--set", "train.bf16=false", "--set", f"model={TINY_AE}"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_line(skipped: dict) -> str:
    detail = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    modes = ", ".join(f"{n} {mode}" for mode, n in sorted(CONVERTED.items()))
    return f"skipped {sum(skipped.values())} ({detail}); converted to RGB {sum(CONVERTED.values())} ({modes})"


def test_a_folder_with_every_kind_of_bad_file(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    entries = []
    for i in range(8):
        (data / f"good{i}.png").write_bytes(good(i))
        entries.append({"file_name": f"good{i}.png", "text": f"picture {i}"})
    files = {**MODES, "zero.png": b"", "truncated.png": TRUNCATED, "text.png": b"hello, not pixels",
             "small.png": TOO_SMALL, "wide.png": TOO_WIDE, "nocaption.png": good(20), "blank.png": good(21)}
    for name, content in files.items():
        (data / name).write_bytes(content)
        if name not in ("nocaption.png", "blank.png"):
            entries.append({"file_name": name, "text": f"the {name}"})
    entries += [{"file_name": "nocaption.png"}, {"file_name": "blank.png", "text": "  "},
                {"file_name": "gone.png", "text": "a file that is not there"}]
    lines = [json.dumps(e) for e in entries] + ["{not json"]
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    code, out, err = run_report(str(data), tmp_path / "run", capsys)
    assert code == 0, err
    line = expected_line(SAMPLE_REASONS)
    assert f"data: {line}" in out  # the end-of-run report
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count(f"data: {data}: {line}") == 2  # at the start and at the end of the log
    assert "13 examples" in log


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def test_a_shard_set_with_every_kind_of_bad_sample_and_shard(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    members = []
    for i in range(8):
        members += [(f"g{i}.png", good(i)), (f"g{i}.txt", f"picture {i}".encode()), (f"g{i}.json", b'{"i": 1}')]
    for j, (name, content) in enumerate(MODES.items()):
        members += [(f"m{j}.{name.split('.')[1]}", content), (f"m{j}.txt", name.encode())]
    members += [("nofile.txt", b"caption without image"), ("nocap.png", good(20)),
                ("blank.png", good(21)), ("blank.txt", b" \n"), ("zero.png", b""), ("zero.txt", b"z"),
                ("trunc.png", TRUNCATED), ("trunc.txt", b"t"), ("text.png", b"hello"), ("text.txt", b"x"),
                ("badjson.png", good(22)), ("badjson.txt", b"j"), ("badjson.json", b"{nope"),
                ("small.png", TOO_SMALL), ("small.txt", b"s"), ("wide.png", TOO_WIDE), ("wide.txt", b"w")]
    (shards / "000000.tar").write_bytes(tar_bytes(members))
    cut = tar_bytes([(f"c{i}.{ext}", good(30 + i) if ext == "png" else b"cut") for i in range(3) for ext in ("png", "txt")])
    with tarfile.open(fileobj=io.BytesIO(cut)) as tar:
        inside_third = tar.getmember("c2.png").offset_data + 100
    (shards / "000001.tar").write_bytes(cut[:inside_third])  # the first two samples are kept
    (shards / "000002.tar").write_bytes(b"this is not a tar file" * 40)
    (shards / "000004.tar").write_bytes(b"")  # 000003.tar does not exist at all

    code, out, err = run_report(str(shards / "{000000..000004}.tar"), tmp_path / "run", capsys)
    assert code == 0, err
    line = expected_line({**SAMPLE_REASONS, "unreadable shard": 4})
    assert f"data: {line}" in out
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count(line) == 2 and "15 examples" in log


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_an_empty_dataset_is_one_clear_error(tmp_path, capsys, kind):
    if kind == "folder":
        (tmp_path / "zero.png").write_bytes(b"")
        (tmp_path / "zero.txt").write_text("a caption")
        data, message = str(tmp_path), "has no usable images"
    else:
        (tmp_path / "000000.tar").write_bytes(b"garbage")
        data, message = str(tmp_path / "{000000..000001}.tar"), "the shards hold no usable samples"
    code, _, err = run_report(data, tmp_path / "run", capsys)
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err
