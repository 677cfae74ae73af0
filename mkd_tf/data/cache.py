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


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_problem(manifest):
    """What is structurally wrong with a manifest of this format and version (`None` when nothing).

    Checked before any array is opened, so that a hand-edited manifest is one line, not a traceback
    from a memory map of the wrong shape (and so that `files` cannot point outside the cache).
    """
    size = manifest.get("size")
    if not _is_count(size) or size < 1:
        return f'"size" is {size!r}'
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return '"classes" is not a list of names'
    files = manifest.get("files")
    if not isinstance(files, dict):
        return '"files" is not a mapping'
    for relative, record in files.items():
        if relative not in _CACHE_ENTRIES or relative in ROLES or relative == "manifest.json":
            return f'"files" lists {relative!r}, which is not a slice cache file'
        if (
            not isinstance(record, dict)
            or not _is_count(record.get("bytes"))
            or not isinstance(record.get("sha256"), str)
        ):
            return f'"files" record of {relative} is not {{"bytes": int, "sha256": str}}'
    modalities = manifest.get("modalities")
    if not isinstance(modalities, dict):
        return '"modalities" is not a mapping'
    for role in ROLES:
        record = modalities.get(role)
        if (
            not isinstance(record, dict)
            or not _is_count(record.get("slices"))
            or not isinstance(record.get("volumes"), list)
        ):
            return f'"modalities" has no valid "{role}" record (slices, volumes)'
        count = record["slices"]
        for key, (name, dtype) in _FILES.items():
            relative = f"{role}/{name}"
            per_slice = 4 * np.dtype(dtype).itemsize if key == "slices" else size * size * np.dtype(dtype).itemsize
            if relative not in files:
                return f'"files" does not list {relative}'
            if files[relative]["bytes"] != count * per_slice:
                return (
                    f"{relative} is listed with {files[relative]['bytes']} bytes, but {count} slices need "
                    f"{count * per_slice}"
                )
        for volume in record["volumes"]:
            bounds = volume.get("slices") if isinstance(volume, dict) else None
            if (
                not isinstance(bounds, list)
                or len(bounds) != 2
                or not all(_is_count(b) for b in bounds)
                or not bounds[0] <= bounds[1] <= count
                or volume.get("split") not in SPLITS
                or not isinstance(volume.get("labelled"), bool)
            ):
                return f'a "{role}" volume record is malformed ({str(volume)[:80]})'
    return None


def _sha256(path, chunk=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
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
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            fail(manifest_path, f"not an {FORMAT} manifest")
        if self.manifest.get("version") != VERSION:
            fail(manifest_path, f"cache format version {self.manifest.get('version')}, expected {VERSION}")
        problem = _manifest_problem(self.manifest)
        if problem:
            fail(manifest_path, f"altered or incomplete manifest: {problem}")
        for relative, expected in self.manifest["files"].items():
            file = self.path / relative
            if not file.exists():
                fail(file, "missing from the slice cache")
            actual = file.stat().st_size
            if actual != expected["bytes"]:
                fail(file, f"truncated or altered: {actual} bytes, manifest says {expected['bytes']}")
            if verify and _sha256(file) != expected["sha256"]:
                fail(file, "checksum mismatch: the file changed since `mkd prepare` wrote it")
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
