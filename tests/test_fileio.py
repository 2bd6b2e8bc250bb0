"""openk2.fileio: atomic, durable small-file writes."""

import os

from openk2.fileio import atomic_write


def test_atomic_write_replaces_durably_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    target.write_text("old")
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(target, "step_000002\n")
    atomic_write(tmp_path / "blob", b"\x00\xff")
    assert target.read_text() == "step_000002\n" and (tmp_path / "blob").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "latest"]  # no temp file left behind
    # the data before the rename (fsynced under the temp name), then the directory after it
    assert synced[1] == str(tmp_path) and synced[0].startswith(str(tmp_path / ".latest.tmp-"))
