"""cache: the slice cache's layout, atomic publication and verification on open."""

import hashlib
import json

import numpy as np
import pytest

from mkd_tf.data.cache import FORMAT, HAS_LABEL, SLICE, SPLIT, VERSION, VOLUME, CacheWriter, SliceCache
from mkd_tf.errors import MkdError
from tests.conftest import cache_entry, cache_manifest, leftovers

SIZE = 8


def _slices(count, start):
    """`count` distinguishable slices: every pixel of slice i holds start + i."""
    return np.broadcast_to((start + np.arange(count, dtype=np.float32))[:, None, None], (count, SIZE, SIZE)).copy()


def _labels(count, value):
    labels = np.zeros((count, SIZE, SIZE), np.uint8)
    labels[:, 2:5, 3:6] = value
    return labels


def _write(out, overwrite=False, shift=0.0):
    with CacheWriter(out, SIZE, overwrite=overwrite) as writer:
        writer.add_volume("target", _slices(3, 0 + shift), _labels(3, 1), "train", True, cache_entry("t1", SIZE))
        writer.add_volume("target", _slices(2, 10 + shift), _labels(2, 2), "train", False, cache_entry("t2", SIZE))
        writer.add_volume("target", _slices(4, 20 + shift), _labels(4, 2), "test", True, cache_entry("t3", SIZE))
        writer.add_volume("assistant", _slices(5, 100 + shift), _labels(5, 1), "train", True, cache_entry("a1", SIZE))
        return writer.finish(cache_manifest(SIZE, ["background", "myocardium", "left_ventricle"], note="hand-made"))


@pytest.fixture
def cache_path(tmp_path):
    return _write(tmp_path / "cache")


def test_layout_manifest_and_arrays(cache_path):
    assert sorted(p.name for p in cache_path.iterdir()) == ["assistant", "manifest.json", "target"]
    manifest = json.loads((cache_path / "manifest.json").read_text())
    assert (manifest["format"], manifest["version"], manifest["size"], manifest["note"]) == (
        FORMAT,
        VERSION,
        SIZE,
        "hand-made",
    )
    # 9 target slices of 8 x 8 float32 = 2304 bytes; 9 x 4 int32 = 144 bytes.
    assert manifest["files"]["target/images.f32"]["bytes"] == 9 * SIZE * SIZE * 4
    assert manifest["files"]["target/labels.u8"]["bytes"] == 9 * SIZE * SIZE
    assert manifest["files"]["target/slices.i32"]["bytes"] == 9 * 4 * 4
    raw = (cache_path / "assistant" / "images.f32").read_bytes()
    assert manifest["files"]["assistant/images.f32"]["sha256"] == hashlib.sha256(raw).hexdigest()
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(5, SIZE, SIZE), _slices(5, 100))

    cache = SliceCache(cache_path)
    assert cache.classes == ["background", "myocardium", "left_ventricle"] and cache.num_classes == 3
    assert cache.size == SIZE
    images = cache.images("target")
    assert images.shape == (9, SIZE, SIZE) and images.dtype == np.float32
    np.testing.assert_array_equal(images[:, 0, 0], [0, 1, 2, 10, 11, 20, 21, 22, 23])
    table = cache.slice_table("target")
    np.testing.assert_array_equal(table[:, VOLUME], [0, 0, 0, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(table[:, SLICE], [0, 1, 2, 0, 1, 0, 1, 2, 3])
    np.testing.assert_array_equal(table[:, SPLIT], [0, 0, 0, 0, 0, 2, 2, 2, 2])
    np.testing.assert_array_equal(table[:, HAS_LABEL], [1, 1, 1, 0, 0, 1, 1, 1, 1])
    labels = cache.labels("target")
    # The unlabelled volume's labels are stored as background, whatever the writer was given.
    assert labels[3:5].max() == 0
    np.testing.assert_array_equal(labels[0:3], _labels(3, 1))
    np.testing.assert_array_equal(labels[5:9], _labels(4, 2))
    volumes = cache.volumes("target")
    assert [(v["case_id"], v["split"], v["labelled"], v["slices"]) for v in volumes] == [
        ("t1", "train", True, [0, 3]),
        ("t2", "train", False, [3, 5]),
        ("t3", "test", True, [5, 9]),
    ]
    assert [v["case_id"] for v in cache.volumes("target", "test")] == ["t3"]
    assert cache.modality("assistant")["slices"] == 5


def test_indices(cache_path):
    cache = SliceCache(cache_path)
    np.testing.assert_array_equal(cache.indices("target", "train"), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(cache.indices("target", "train", labelled=True), [0, 1, 2])
    np.testing.assert_array_equal(cache.indices("target", "train", labelled=False), [3, 4])
    np.testing.assert_array_equal(cache.indices("target", "test"), [5, 6, 7, 8])
    assert cache.indices("target", "val").size == 0
    np.testing.assert_array_equal(cache.indices("assistant"), np.arange(5))


def test_empty_role_reads_as_zero_slices(tmp_path):
    with CacheWriter(tmp_path / "cache", SIZE) as writer:
        writer.add_volume("target", _slices(2, 0), None, "train", False, cache_entry("t1", SIZE))
        writer.finish(cache_manifest(SIZE, ["background", "x"]))
    cache = SliceCache(tmp_path / "cache")
    assert cache.images("assistant").shape == (0, SIZE, SIZE)
    assert cache.slice_table("assistant").shape == (0, 4)
    assert cache.labels("target").max() == 0


def test_wrong_slice_size_is_refused(tmp_path):
    with CacheWriter(tmp_path / "cache", SIZE) as writer:
        with pytest.raises(ValueError, match="slices must be 8x8"):
            writer.add_volume("target", np.zeros((2, SIZE, SIZE + 1)), None, "train", False, {})
    assert not (tmp_path / "cache").exists() and leftovers(tmp_path / "cache") == []


def test_exception_before_finish_leaves_nothing(tmp_path):
    out = tmp_path / "cache"
    with pytest.raises(RuntimeError):
        with CacheWriter(out, SIZE) as writer:
            writer.add_volume("target", _slices(3, 0), _labels(3, 1), "train", True, cache_entry("t1", SIZE))
            assert leftovers(out)  # the staging folder exists while writing, hidden
            raise RuntimeError("killed")
    assert not out.exists()
    assert leftovers(out) == []
    assert list(tmp_path.iterdir()) == []


def test_existing_cache_needs_overwrite_and_survives_a_failed_rewrite(cache_path):
    with pytest.raises(MkdError) as info:
        CacheWriter(cache_path, SIZE)
    assert str(info.value) == f"{cache_path}: already exists (use --overwrite to replace it)"
    with pytest.raises(RuntimeError):
        with CacheWriter(cache_path, SIZE, overwrite=True) as writer:
            writer.add_volume("target", _slices(1, 50), None, "train", False, cache_entry("new", SIZE))
            raise RuntimeError("killed")
    # The old cache is untouched and still verifies.
    cache = SliceCache(cache_path)
    assert [v["case_id"] for v in cache.volumes("target")] == ["t1", "t2", "t3"]
    assert leftovers(cache_path) == []


def test_overwrite_replaces_once_complete(cache_path):
    _write(cache_path, overwrite=True, shift=0.5)
    cache = SliceCache(cache_path)
    np.testing.assert_array_equal(cache.images("target")[:3, 0, 0], [0.5, 1.5, 2.5])
    assert leftovers(cache_path) == []


def _message(path, verify=True):
    with pytest.raises(MkdError) as info:
        SliceCache(path, verify=verify)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_truncated_file_fails_the_size_check(cache_path):
    file = cache_path / "target" / "images.f32"
    file.write_bytes(file.read_bytes()[: -SIZE * SIZE * 4])
    for verify in (True, False):
        assert _message(cache_path, verify) == (
            f"{file}: truncated or altered: {8 * SIZE * SIZE * 4} bytes, manifest says {9 * SIZE * SIZE * 4}"
        )


def test_changed_byte_fails_the_checksum(cache_path):
    file = cache_path / "assistant" / "labels.u8"
    data = bytearray(file.read_bytes())
    data[100] ^= 1  # slice 1, row 4, column 4: myocardium (1) becomes background (0)
    file.write_bytes(bytes(data))
    assert _message(cache_path) == f"{file}: checksum mismatch: the file changed since `mkd prepare` wrote it"
    # Without verification only sizes are checked, and the change goes unnoticed.
    assert SliceCache(cache_path, verify=False).labels("assistant")[1, 4, 4] == 0


def test_incomplete_or_foreign_caches(cache_path, tmp_path):
    assert _message(tmp_path / "nope") == f"{tmp_path / 'nope'}: slice cache not found"
    manifest = cache_path / "manifest.json"
    text = manifest.read_text()
    (cache_path / "target" / "slices.i32").unlink()
    assert _message(cache_path) == f"{cache_path / 'target' / 'slices.i32'}: missing from the slice cache"
    manifest.write_text(json.dumps(dict(json.loads(text), version=VERSION + 1)))
    assert f"cache format version {VERSION + 1}, expected {VERSION}" in _message(cache_path)
    manifest.write_text(json.dumps({"format": "something-else"}))
    assert _message(cache_path) == f"{manifest}: not an {FORMAT} manifest"
    manifest.write_text(text[: len(text) // 2])
    assert _message(cache_path).startswith(f"{manifest}: corrupt manifest")
    manifest.unlink()
    assert _message(cache_path) == (
        f"{cache_path}: not a complete slice cache (no manifest.json); run `mkd prepare` again"
    )


# --- what may be replaced, and stale siblings ------------------------------------------------------------


def test_not_a_slice_cache(cache_path, tmp_path):
    from mkd_tf.data.cache import not_a_slice_cache

    assert not_a_slice_cache(cache_path) is None
    (tmp_path / "plain").mkdir()
    assert not_a_slice_cache(tmp_path / "plain") == "it has no manifest.json"
    (cache_path / "target" / "notes.md").write_text("mine")
    assert not_a_slice_cache(cache_path) == "it holds target/notes.md, which a slice cache does not"
    with pytest.raises(MkdError) as info:
        CacheWriter(cache_path, SIZE, overwrite=True)
    assert str(info.value) == (
        f"{cache_path}: --overwrite replaces only a slice cache, and this is not one (it holds "
        "target/notes.md, which a slice cache does not); nothing was changed"
    )
    assert (cache_path / "target" / "notes.md").read_text() == "mine" and leftovers(cache_path) == []


def test_a_folder_that_appears_while_writing_is_not_replaced(tmp_path):
    out = tmp_path / "cache"
    with pytest.raises(MkdError) as info:
        with CacheWriter(out, SIZE) as writer:
            writer.add_volume("target", _slices(1, 0), None, "train", False, cache_entry("t1", SIZE))
            out.mkdir()
            (out / "thesis.txt").write_text("mine")
            writer.finish(cache_manifest(SIZE, ["background", "x"]))
    assert str(info.value).startswith(
        f"{out}: already exists (it appeared or changed while preparing) and is not a slice cache"
    )
    assert [p.name for p in out.iterdir()] == ["thesis.txt"] and leftovers(out) == []


def test_a_running_writers_staging_folder_is_not_removed_as_stale(tmp_path):
    out = tmp_path / "cache"
    running = CacheWriter(out, SIZE)  # another prepare of the same output, still writing
    running.add_volume("target", _slices(1, 0), None, "train", False, cache_entry("t1", SIZE))
    _write(out)
    assert leftovers(out) == [running.staging.name]
    running.__exit__(None, None, None)
    assert leftovers(out) == []
    SliceCache(out)
