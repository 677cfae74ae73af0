"""The slice cache: preprocessed 2-D slices of both modalities on disk, plus a JSON manifest.

Layout of a cache folder::

    CACHE/
      manifest.json            dataset, classes, spacing, size, split, per-volume inverse parameters,
                               file sizes and SHA-256 checksums
      target/images.f32        float32 (slices, size, size), C order, little endian
      target/labels.u8         uint8   (slices, size, size), class indices (0 where unlabelled)
      target/slices.i32        int32   (slices, 4): volume index, slice index, split code, has_label
      assistant/...            the same for the assistant modality

Raw arrays (not .npy) so that :class:`CacheWriter` can append volume after volume without holding the
dataset in memory; :class:`SliceCache` opens them as read-only memory maps.

Atomicity: everything is written into a hidden sibling folder (``.CACHE.tmp-<8 hex>``) and renamed into
place only after the manifest (written last) is complete, so a killed ``prepare`` leaves no cache that
looks complete. Replacing a cache (``overwrite``) moves the old one aside (``.CACHE.old-<8 hex>``) and
deletes it once the new one is in place. Only a folder that is a slice cache is ever replaced, and the
next successful write of ``CACHE`` removes stale ``.CACHE.tmp-*`` / ``.CACHE.old-*`` siblings left by a
killed run (never one that another running ``prepare`` still holds, never one holding foreign files).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from mkd_tf import schema
from mkd_tf.errors import fail
from mkd_tf.files import check_parent_is_folder, lock_folder, remove_stale_staging, temporary_sibling

FORMAT = "mkd-slice-cache"
VERSION = 1
ROLES = ("target", "assistant")
SPLITS = ("train", "val", "test")
# Columns of slices.i32.
VOLUME, SLICE, SPLIT, HAS_LABEL = range(4)
_FILES = {"images": ("images.f32", np.float32), "labels": ("labels.u8", np.uint8), "slices": ("slices.i32", np.int32)}
# Every path a cache folder may hold, relative to it.
_CACHE_ENTRIES = frozenset(
    ["manifest.json", *ROLES, *(f"{role}/{name}" for role in ROLES for name, _ in _FILES.values())]
)


def _output_folder(out):
    """The folder path to create for ``out`` (absolute when ``out`` has no name of its own, e.g. `.`)."""
    path = Path(out)
    if path.name in ("", ".", ".."):
        path = Path(os.path.realpath(path))
    if path.name in ("", ".", ".."):
        fail(out, "not a folder name a slice cache can be written to")
    return path


def _foreign_entries(folder):
    """Paths under ``folder`` (relative, sorted) that a slice cache never holds; symbolic links included."""
    foreign = []
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name == "manifest.json" and entry.is_file(follow_symlinks=False):
                continue
            if entry.name in ROLES and entry.is_dir(follow_symlinks=False):
                with os.scandir(entry.path) as inner:
                    for item in sorted(inner, key=lambda e: e.name):
                        relative = f"{entry.name}/{item.name}"
                        if relative not in _CACHE_ENTRIES or not item.is_file(follow_symlinks=False):
                            foreign.append(relative)
                continue
            foreign.append(entry.name)
    return foreign


def not_a_slice_cache(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a slice cache that may be replaced, or `None` when it is one.

    A slice cache is a real folder (not a symbolic link) holding a `manifest.json` of this format and
    nothing but the files a cache has; a damaged cache (bad checksums, an older version) still counts.
    """
    path = Path(path)
    if path.is_symlink():
        return "it is a symbolic link"
    if not path.is_dir():
        return "it is a file, not a folder"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        return "it has no manifest.json"
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"its manifest.json is unreadable ({type(exc).__name__})"
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        return f"its manifest.json is not an {FORMAT} manifest"
    foreign = _foreign_entries(path)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        return f"it holds {foreign[0]}{more}, which a slice cache does not"
    return None


def _refuse_existing(out, overwrite, when=""):
    """Fail unless ``out`` (which exists) may be replaced."""
    problem = not_a_slice_cache(out)
    if not overwrite:
        if problem is None:
            fail(out, f"already exists{when} (use --overwrite to replace it)")
        fail(out, f"already exists{when} and is not a slice cache ({problem}); choose another --out")
    if problem is not None:
        fail(out, f"--overwrite replaces only a slice cache, and this is not one ({problem}); nothing was changed")


def check_parent_folders(out: str | os.PathLike, what: str = "the slice cache") -> Path:
    """Refuse an output path whose nearest existing parent is not a folder (e.g. a regular file).

    Returns:
        The output folder's path (see :func:`_output_folder`).
    """
    folder = _output_folder(out)
    check_parent_is_folder(folder, f"create {what}")
    return folder


def check_output(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, before anything is written, an ``out`` that cannot be created or must not be replaced.

    Raises:
        MkdError: a parent is a file; ``out`` exists and ``overwrite`` is off; or ``out`` exists and is
            not a slice cache (see :func:`not_a_slice_cache`).
    """
    folder = check_parent_folders(out)
    if folder.exists() or folder.is_symlink():
        _refuse_existing(out, overwrite)
    return folder


def remove_stale_siblings(out: str | os.PathLike) -> list[Path]:
    """Delete the `.NAME.tmp-*` / `.NAME.old-*` folders a killed write of ``out`` left next to it.

    Only folders matching exactly that pattern for ``out``'s own name, holding nothing but slice cache
    files, and not locked by a running writer are removed (:func:`mkd_tf.files.remove_stale_staging`).
    Returns the removed paths.
    """
    return remove_stale_staging(
        _output_folder(out), lambda candidate: not _foreign_entries(candidate), kinds=("tmp", "old")
    )


class CacheWriter:
    """Append preprocessed volumes to a new cache; publish it atomically on :meth:`finish`.

    Args:
        out: the cache folder to create.
        size: slice height and width.
        overwrite: replace an existing cache at ``out`` (only once the new one is complete).

    :func:`mkd_tf.data.prepare.prepare_cache` drives it: one :meth:`add_volume` per preprocessed case,
    then :meth:`finish` with the manifest; until then nothing is visible at ``out``.
    """

    def __init__(self, out: str | os.PathLike, size: int, overwrite: bool = False) -> None:
        self.out = Path(out)
        self.size = int(size)
        self.overwrite = overwrite
        self._folder = check_output(self.out, overwrite)
        self._handles, self._hashes, self._counts, self._volumes = {}, {}, {}, {}
        self._created, self._lock, self._finished = [], None, False
        self.staging = temporary_sibling(self._folder, folder=True)
        try:
            self._make_parents()
            self.staging.mkdir()
            self._lock = lock_folder(self.staging)  # tells remove_stale_siblings that this one is in use
            for role in ROLES:
                (self.staging / role).mkdir()
                self._counts[role] = 0
                self._volumes[role] = []
                for key, (name, _) in _FILES.items():
                    self._handles[role, key] = open(self.staging / role / name, "wb")
                    self._hashes[role, key] = hashlib.sha256()
        except BaseException:
            self._clean_up()
            raise

    def _make_parents(self):
        missing = []
        for parent in self._folder.parents:
            if parent.exists():
                break
            missing.append(parent)
        for parent in reversed(missing):
            parent.mkdir()
            self._created.append(parent)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._clean_up()
        return False

    def _clean_up(self):
        self._close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        if not self._finished:
            for parent in reversed(self._created):  # folders this writer made for `out`, if still empty
                try:
                    parent.rmdir()
                except OSError:
                    break
            self._created = []

    def _write(self, role, key, array):
        data = np.ascontiguousarray(array, dtype=_FILES[key][1]).tobytes()
        self._handles[role, key].write(data)
        self._hashes[role, key].update(data)

    def add_volume(
        self,
        role: str,
        images: np.ndarray,
        labels: np.ndarray,
        split: str,
        has_label: bool,
        entry: dict[str, Any],
    ) -> None:
        """Append one volume's slices.

        Args:
            role: `"target"` or `"assistant"`.
            images: `(slices, size, size)` float32.
            labels: `(slices, size, size)` class indices, or `None` when unlabelled.
            split: `"train"`, `"val"` or `"test"`.
            has_label: whether the labels may be used for training/evaluation.
            entry: JSON-serialisable per-volume record (case id, inverse parameters, ...).
        """
        images = np.asarray(images, dtype=np.float32)
        count = images.shape[0]
        if images.shape[1:] != (self.size, self.size):
            raise ValueError(f"slices must be {self.size}x{self.size}, got {images.shape[1:]}")
        if labels is None or not has_label:
            labels = np.zeros(images.shape, np.uint8)
        volume_index = len(self._volumes[role])
        table = np.zeros((count, 4), np.int32)
        table[:, VOLUME] = volume_index
        table[:, SLICE] = np.arange(count)
        table[:, SPLIT] = SPLITS.index(split)
        table[:, HAS_LABEL] = int(bool(has_label))
        self._write(role, "images", images)
        self._write(role, "labels", labels)
        self._write(role, "slices", table)
        start = self._counts[role]
        self._counts[role] += count
        self._volumes[role].append(dict(entry, split=split, labelled=bool(has_label), slices=[start, start + count]))

    def _close(self):
        for handle in self._handles.values():
            if not handle.closed:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()

    def finish(self, manifest: dict[str, Any]) -> Path:
        """Write the manifest and move the cache into place. Returns the cache path."""
        self._close()
        files = {}
        for role in ROLES:
            for key, (name, dtype) in _FILES.items():
                relative = f"{role}/{name}"
                files[relative] = {
                    "bytes": (self.staging / relative).stat().st_size,
                    "sha256": self._hashes[role, key].hexdigest(),
                }
            manifest.setdefault("modalities", {}).setdefault(role, {})
            manifest["modalities"][role]["slices"] = self._counts[role]
            manifest["modalities"][role]["volumes"] = self._volumes[role]
        manifest = dict(manifest, format=FORMAT, version=VERSION, size=self.size, files=files)
        manifest_path = self.staging / "manifest.json"
        with open(manifest_path, "w") as handle:
            json.dump(manifest, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        folder = self._folder
        if folder.exists() or folder.is_symlink():
            # Checked again: the folder may have appeared or changed while the volumes were written.
            _refuse_existing(
                self.out, self.overwrite, when=" (it appeared or changed while preparing)" if not self.overwrite else ""
            )
            retired = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(folder, retired)
            try:
                os.replace(self.staging, folder)
            except BaseException:
                os.replace(retired, folder)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(self.staging, folder)
        self._finished = True
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        remove_stale_siblings(folder)
        return self.out


#: ``preprocess`` of a manifest and of a run's cache.json (:class:`mkd_tf.data.preprocess.PreprocessConfig`)
PREPROCESS = {
    "spacing": schema.numbers(3, low=0, low_open=True),
    "size": schema.integer(1),
    "axis": schema.integer(0, 2),
    "ct_window": schema.numbers(2),
    "percentiles": schema.numbers(2, low=0),
}
#: a volume's intensity rule (``inverse.intensity``; a run's ``target_intensity``), by its kind
INTENSITY = {
    "ct": {"kind": schema.text(), "window": schema.numbers(2)},
    "zscore": {"kind": schema.text(), "clip": schema.numbers(2), "mean": schema.number(), "std": schema.number()},
}
_INTENSITY = schema.mapping({"kind": schema.text(choices=tuple(INTENSITY))})
#: a volume's inverse-preprocessing record (:func:`mkd_tf.data.preprocess.preprocess_volume`)
INVERSE = {
    "original_shape": schema.listing(schema.integer(1), length=3),
    "original_affine": schema.listing(schema.numbers(4), length=4),
    "ornt": schema.listing(schema.numbers(2), length=3),
    "canonical_shape": schema.listing(schema.integer(1), length=3),
    "canonical_spacing": schema.numbers(3, low=0, low_open=True),
    "spacing": schema.numbers(3, low=0, low_open=True),
    "resampled_shape": schema.listing(schema.integer(1), length=3),
    "axis": schema.integer(0, 2),
    "plane_axes": schema.listing(schema.integer(0, 2), length=2),
    "crop_start": schema.listing(schema.integer(), length=2),
    "size": schema.integer(1),
    "intensity": _INTENSITY,
}
#: class name -> the value it has in the dataset's label files
LABEL_VALUES = schema.mapping(values=schema.integer(0))
_VOLUME = schema.mapping(
    {
        "case_id": schema.text(),
        "image": schema.text(),
        "label": schema.text(nullable=True),
        "inverse": schema.mapping(INVERSE),
        "split": schema.text(choices=SPLITS),
        "labelled": schema.boolean(),
        "slices": schema.listing(schema.integer(0), length=2),
        # what the label file was when it was cached (caches written before it existed lack it)
        "label_file": schema.mapping({"bytes": schema.integer(0), "sha256": schema.text()}, required=False),
    }
)
_MODALITY = schema.mapping(
    {
        "name": schema.text(),
        "layout": schema.text(required=False),  # `mkd info` shows "?" without it
        "root": schema.text(required=False),
        "label_values": LABEL_VALUES,
        "label_source": schema.text(required=False),
        "slices": schema.integer(0),
        "volumes": schema.listing(_VOLUME),
    }
)
#: the manifest of a slice cache of this format and version (``format`` and ``version`` are checked first)
MANIFEST = {
    "format": schema.text(),
    "version": schema.integer(),
    "size": schema.integer(1),
    "classes": schema.strings(min_length=2),
    "preprocess": schema.mapping(PREPROCESS),
    "split": schema.mapping(required=False),  # informative only (`mkd info`)
    "crop": schema.mapping(required=False),  # written since --allow-crop exists
    "files": schema.mapping(values=schema.mapping({"bytes": schema.integer(0), "sha256": schema.text()})),
    "modalities": schema.mapping({role: _MODALITY for role in ROLES}),
}


def check_label_values(path: str | os.PathLike, classes: list[str], label_values: dict[str, int], key: str) -> None:
    """Fail unless ``label_values`` (name -> value) names exactly ``classes`` with distinct values."""
    if list(label_values) != list(classes):
        fail(path, f"key '{key}' names {list(label_values)}, but the classes are {list(classes)}")
    seen = {}
    for name, value in label_values.items():
        if value in seen:
            fail(path, f"key '{key}' gives {seen[value]} and {name} the same value {value}")
        seen[value] = name


def check_intensity(path: str | os.PathLike, intensity: dict[str, Any], key: str) -> None:
    """Fail unless an intensity rule has the keys of its kind (:data:`INTENSITY`)."""
    found = schema.schema_problem(intensity, INTENSITY[intensity["kind"]], key)
    if found:
        fail(path, f"key '{found[0]}' {found[1]}")


def check_manifest(path: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Fail with one line on the first key of ``manifest`` that :data:`MANIFEST` or a cross-check refuses.

    Checked before any array is opened, so that a hand-edited manifest is one line, not a traceback
    from a memory map of the wrong shape (and so that `files` cannot point outside the cache).

    Args:
        path: the manifest file (for the message).
        manifest: its parsed content.
    """
    if not isinstance(manifest, dict):
        fail(path, f"not an {FORMAT} manifest")
    schema.validate(path, manifest, {"format": MANIFEST["format"]})
    if manifest["format"] != FORMAT:  # another tool's file: its other keys mean nothing here
        fail(path, f"not an {FORMAT} manifest")
    schema.validate(path, manifest, {"version": MANIFEST["version"]})
    if manifest["version"] != VERSION:  # no older version exists: a newer one needs a newer mkd-tf
        fail(path, f"cache format version {manifest['version']}, expected {VERSION}")
    schema.validate(path, manifest, MANIFEST)
    size, classes, files = manifest["size"], manifest["classes"], manifest["files"]
    if manifest["preprocess"]["size"] != size:
        fail(path, f"key 'preprocess.size' is {manifest['preprocess']['size']}, but key 'size' is {size}")
    for relative in files:
        if relative not in _CACHE_ENTRIES or relative in ROLES or relative == "manifest.json":
            fail(path, f"key 'files' lists {relative!r}, which is not a slice cache file")
    for role in ROLES:
        record = manifest["modalities"][role]
        check_label_values(path, classes, record["label_values"], f"modalities.{role}.label_values")
        count = record["slices"]
        for key, (name, dtype) in _FILES.items():
            relative = f"{role}/{name}"
            per_slice = 4 * np.dtype(dtype).itemsize if key == "slices" else size * size * np.dtype(dtype).itemsize
            if relative not in files:
                fail(path, f"key 'files.{relative}' is missing")
            if files[relative]["bytes"] != count * per_slice:
                fail(
                    path,
                    f"key 'files.{relative}': {files[relative]['bytes']} bytes, but "
                    f"'modalities.{role}.slices' ({count}) of {size}x{size} need {count * per_slice}",
                )
        for index, volume in enumerate(record["volumes"]):
            key = f"modalities.{role}.volumes[{index}]"
            start, stop = volume["slices"]
            if not start <= stop <= count:
                fail(path, f"key '{key}.slices' must be a range within [0, {count}], got {[start, stop]}")
            if volume["labelled"] and volume["label"] is None:
                fail(path, f"key '{key}.label' is null, but the volume is labelled")
            check_intensity(path, volume["inverse"]["intensity"], f"{key}.inverse.intensity")


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"bytes": size, "sha256": checksum}`` of a file (what a manifest records of a label file)."""
    return {"bytes": Path(path).stat().st_size, "sha256": _sha256(path)}


def _sha256(path, chunk=1 << 22, largest=None):
    """SHA-256 of a file; with ``largest`` (a one-element list) also the largest byte, read in the same pass."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
            if largest is not None:
                largest[0] = max(largest[0], int(np.frombuffer(block, np.uint8).max()))
    return digest.hexdigest()


class SliceCache:
    """A verified, read-only view of a slice cache.

    Args:
        path: the cache folder written by ``mkd prepare``.
        verify: also compare SHA-256 checksums (sizes are always checked).

    Example:
        >>> cache = SliceCache("cache")
        >>> images = cache.images("target")          # (slices, size, size) float32 memmap
        >>> images.dtype, images.shape[1:]
        (dtype('float32'), (32, 32))
        >>> train = cache.indices("target", "train", labelled=True)  # row numbers of labelled slices
        >>> bool(train.size > 0)
        True
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            fail(self.path, "slice cache not found")
        if not self.path.is_dir():
            fail(self.path, "not a slice cache (a file, not a folder)")
        manifest_path = self.path / "manifest.json"
        if not manifest_path.exists():
            fail(self.path, "not a complete slice cache (no manifest.json); run `mkd prepare` again")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            fail(manifest_path, f"corrupt manifest ({exc})")
        except OSError as exc:
            fail(manifest_path, f"cannot read the manifest ({exc.strerror or exc})")
        check_manifest(manifest_path, self.manifest)
        for relative, expected in self.manifest["files"].items():
            file = self.path / relative
            if not file.exists():
                fail(file, "missing from the slice cache")
            actual = file.stat().st_size
            if actual != expected["bytes"]:
                fail(file, f"truncated or altered: {actual} bytes, manifest says {expected['bytes']}")
            largest = [0] if relative.endswith("/labels.u8") else None
            if verify and _sha256(file, largest=largest) != expected["sha256"]:
                fail(file, "checksum mismatch: the file changed since `mkd prepare` wrote it")
            if verify and largest is not None and largest[0] >= len(self.manifest["classes"]):
                # a class index the manifest does not name: scoring it would count voxels of no class
                fail(
                    file,
                    f"holds class index {largest[0]}, but key 'classes' of {manifest_path} lists "
                    f"{len(self.manifest['classes'])} classes ({', '.join(self.manifest['classes'])})",
                )
        self._arrays = {}

    @property
    def classes(self) -> list[str]:
        """Class names, background first."""
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    def modality(self, role: str) -> dict[str, Any]:
        """The manifest record of `"target"` or `"assistant"`."""
        return self.manifest["modalities"][role]

    def volumes(self, role: str, split: str | None = None) -> list[dict[str, Any]]:
        """Per-volume records (case id, split, labelled, slice range, inverse parameters)."""
        return [v for v in self.modality(role)["volumes"] if split is None or v["split"] == split]

    def _array(self, role, key):
        if (role, key) not in self._arrays:
            name, dtype = _FILES[key]
            count = self.modality(role)["slices"]
            shape = (count, 4) if key == "slices" else (count, self.size, self.size)
            if count == 0:
                self._arrays[role, key] = np.zeros(shape, dtype)
            else:
                self._arrays[role, key] = np.memmap(self.path / role / name, dtype=dtype, mode="r", shape=shape)
        return self._arrays[role, key]

    def images(self, role: str) -> np.ndarray:
        """`(slices, size, size)` float32 preprocessed intensities."""
        return self._array(role, "images")

    def labels(self, role: str) -> np.ndarray:
        """`(slices, size, size)` uint8 class indices (0 for unlabelled slices)."""
        return self._array(role, "labels")

    def slice_table(self, role: str) -> np.ndarray:
        """`(slices, 4)` int32: volume index, slice index, split code, has_label."""
        return self._array(role, "slices")

    def indices(self, role: str, split: str | None = None, labelled: bool | None = None) -> np.ndarray:
        """Row indices of slices of ``role`` in ``split`` (and with/without labels)."""
        table = self.slice_table(role)
        keep = np.ones(len(table), bool)
        if split is not None:
            keep &= table[:, SPLIT] == SPLITS.index(split)
        if labelled is not None:
            keep &= table[:, HAS_LABEL] == int(bool(labelled))
        return np.flatnonzero(keep)
