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
