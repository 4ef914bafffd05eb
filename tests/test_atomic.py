"""Atomic writes: the data is on the disk before the rename makes it visible, and the rename is
on the disk after (what a power loss would otherwise undo or leave empty)."""

import os
from pathlib import Path

from meloformer_model.atomic import atomic_folder, write_bytes_atomic


def _record(monkeypatch) -> list[tuple[str, str]]:
    """Each fsync (the path its descriptor names) and rename, in order."""
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


def test_a_file_is_synced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    events = _record(monkeypatch)
    target = tmp_path / "out.bin"
    write_bytes_atomic(target, b"data")
    assert target.read_bytes() == b"data"
    (_, written), rename, (_, folder) = events
    assert Path(written).parent == tmp_path and Path(written).name.startswith(".out.bin.")
    assert rename == ("replace", str(target)) and folder == str(tmp_path)


def test_a_folder_is_synced_file_by_file_before_it_takes_the_place(tmp_path, monkeypatch):
    events = _record(monkeypatch)
    target = tmp_path / "checkpoint"
    with atomic_folder(target) as folder:
        (folder / "a.json").write_text("{}")
        (folder / "sub").mkdir()
        (folder / "sub" / "b.bin").write_bytes(b"x")
    synced = [Path(path) for kind, path in events[: events.index(("replace", str(target)))]]
    names = {p.relative_to(synced[-1]).as_posix() for p in synced[:-1]}
    assert names == {"a.json", "sub", "sub/b.bin"}  # every entry, then the folder itself
    assert events[-1] == ("fsync", str(tmp_path))
    assert (target / "sub" / "b.bin").read_bytes() == b"x"
