"""Atomic writes: the file appears whole or not at all, with the permissions a plain open() would give."""
import os
import stat

import pytest

from carrara import io


def test_atomic_write_replaces_whole_and_uses_the_umask(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    io.write_json_atomic(path, {"a": 1})
    assert path.read_text().strip().startswith("{") and "old" not in path.read_text()
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o666 & ~io._UMASK  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


def test_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), io.atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
