"""The one atomic-write scheme (mkd_tf/files.py)."""

import json

import pytest

from mkd_tf.errors import MkdError
from mkd_tf.files import atomic_path, read_json, temporary_sibling, write_files_atomic, write_text_atomic


def test_temporary_sibling_is_hidden_next_to_the_file_with_the_same_suffixes(tmp_path):
    temporary = temporary_sibling(tmp_path / "case_1001_label.nii.gz")
    assert temporary.parent == tmp_path
    assert temporary.name.startswith(".case_1001_label.tmp-") and temporary.name.endswith(".nii.gz")


def test_a_folder_sibling_keeps_its_whole_name(tmp_path):
    temporary = temporary_sibling(tmp_path / "cache.v2", folder=True)
    assert (
        temporary.parent == tmp_path and temporary.name.startswith(".cache.v2.tmp-") and "." not in temporary.name[14:]
    )


def test_atomic_path_replaces_only_on_success(tmp_path):
    path = tmp_path / "table.md"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]
    with atomic_path(path) as temporary:
        assert temporary.name.startswith(".table.tmp-") and temporary.suffix == ".md"
        temporary.write_text("new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]


def test_write_files_atomic_is_all_or_nothing(tmp_path):
    """A failure while writing the second file leaves neither file, no temporary and no new folder."""
    (tmp_path / "existing.nii.gz").write_bytes(b"old")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(MkdError, match=r"blocker/o.png: cannot write"):
        write_files_atomic(
            [(tmp_path / "existing.nii.gz", b"new"), (tmp_path / "sub" / "a.nii.gz", b"a"), (blocker / "o.png", b"png")]
        )
    assert (tmp_path / "existing.nii.gz").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "existing.nii.gz"]
    write_files_atomic([(tmp_path / "existing.nii.gz", b"new"), (tmp_path / "sub" / "a.nii.gz", b"a")])
    assert (tmp_path / "existing.nii.gz").read_bytes() == b"new" and (
        tmp_path / "sub" / "a.nii.gz"
    ).read_bytes() == b"a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "existing.nii.gz", "sub"]


def test_read_json_names_the_file_and_the_problem(tmp_path):
    (tmp_path / "ok.json").write_text(json.dumps({"a": 1}))
    assert read_json(tmp_path / "ok.json") == {"a": 1}
    with pytest.raises(MkdError, match="missing.json: file not found"):
        read_json(tmp_path / "missing.json")
    with pytest.raises(MkdError, match="is a folder, not a JSON file"):
        read_json(tmp_path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MkdError, match="bad.json: invalid JSON"):
        read_json(tmp_path / "bad.json")


def test_a_failed_later_rename_takes_back_the_files_already_published(tmp_path, monkeypatch):
    """Renamed one after the other: when the third rename fails, the first two are taken back (a new file
    removed, an existing one given its old content), so the set appears together or not at all."""
    import os

    from mkd_tf import files

    (tmp_path / "old.nii.gz").write_bytes(b"old")
    real_replace = os.replace

    def failing_replace(source, destination):
        if str(destination).endswith("c.png"):
            raise OSError(28, "No space left on device")
        return real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", failing_replace)
    batch = [(tmp_path / "old.nii.gz", b"new"), (tmp_path / "sub" / "b.nii.gz", b"b"), (tmp_path / "c.png", b"c")]
    with pytest.raises(MkdError, match=r"c.png: cannot write \(No space left on device\)"):
        write_files_atomic(batch)
    assert (tmp_path / "old.nii.gz").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.nii.gz"]  # no temporary, backup or new folder
    monkeypatch.setattr(files.os, "replace", real_replace)
    write_files_atomic(batch)
    assert [(path.read_bytes()) for path, _ in batch] == [b"new", b"b", b"c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "old.nii.gz", "sub"]


def test_stale_staged_files_of_ours_are_removed_and_nothing_else(tmp_path):
    import fcntl
    import os

    from mkd_tf.files import remove_stale_staged_files

    out = tmp_path / "case.nii.gz"
    ours = [temporary_sibling(out), out.with_name(".case.old-0123abcd.nii.gz")]
    live = temporary_sibling(out)  # a running writer's: locked
    others = [
        tmp_path / ".case.tmp-0123abcd.png",  # another output's suffix
        tmp_path / ".case.tmp-XYZ.nii.gz",  # not our 8 hex digits
        tmp_path / ".case_2.tmp-0123abcd.nii.gz",  # another case
        tmp_path / "case.tmp-0123abcd.nii.gz",  # not hidden
    ]
    for path in [*ours, live, *others]:
        path.write_bytes(b"x")
    folder = tmp_path / f".case.tmp-{'a' * 8}.nii.gz"
    folder.mkdir()  # a folder is never ours here
    link = tmp_path / f".case.tmp-{'b' * 8}.nii.gz"
    link.symlink_to(others[0])
    descriptor = os.open(live, os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    try:
        removed = remove_stale_staged_files(out)
    finally:
        os.close(descriptor)
    assert sorted(removed) == sorted(ours)
    assert all(p.exists() for p in [live, *others, folder]) and link.is_symlink()
    assert not any(p.exists() for p in ours)
