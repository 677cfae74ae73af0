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

Atomicity: everything is written into a hidden sibling folder and renamed into place only after the
manifest (written last) is complete, so a killed ``prepare`` leaves no cache that looks complete.
"""

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from mkd_tf.errors import fail

FORMAT = "mkd-slice-cache"
VERSION = 1
ROLES = ("target", "assistant")
SPLITS = ("train", "val", "test")
# Columns of slices.i32.
VOLUME, SLICE, SPLIT, HAS_LABEL = range(4)
_FILES = {"images": ("images.f32", np.float32), "labels": ("labels.u8", np.uint8), "slices": ("slices.i32", np.int32)}


class CacheWriter:
    """Append preprocessed volumes to a new cache; publish it atomically on :meth:`finish`.

    Args:
        out: the cache folder to create.
        size: slice height and width.
        overwrite: replace an existing cache at ``out`` (only once the new one is complete).

    Example:
        >>> with CacheWriter("cache", size=64) as writer:
        ...     writer.add_volume("target", images, labels, split="train", has_label=True, entry={...})
        ...     writer.finish({"classes": [...], ...})
    """

    def __init__(self, out, size, overwrite=False):
        self.out = Path(out)
        self.size = int(size)
        if self.out.exists() and not overwrite:
            fail(self.out, "already exists (use --overwrite to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.out.with_name(f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.staging.mkdir()
        self.overwrite = overwrite
        self._handles, self._hashes, self._counts, self._volumes = {}, {}, {}, {}
        for role in ROLES:
            (self.staging / role).mkdir()
            self._counts[role] = 0
            self._volumes[role] = []
            for key, (name, _) in _FILES.items():
                self._handles[role, key] = open(self.staging / role / name, "wb")
                self._hashes[role, key] = hashlib.sha256()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._close()
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        return False

    def _write(self, role, key, array):
        data = np.ascontiguousarray(array, dtype=_FILES[key][1]).tobytes()
        self._handles[role, key].write(data)
        self._hashes[role, key].update(data)

    def add_volume(self, role, images, labels, split, has_label, entry):
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

    def finish(self, manifest):
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
        if self.out.exists():
            retired = self.out.with_name(f".{self.out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.out, retired)
            os.replace(self.staging, self.out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(self.staging, self.out)
        return self.out


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
        >>> train = cache.indices("target", "train", labelled=True)
    """

    def __init__(self, path, verify=True):
        self.path = Path(path)
        if not self.path.is_dir():
            fail(self.path, "slice cache not found")
        manifest_path = self.path / "manifest.json"
        if not manifest_path.exists():
            fail(self.path, "not a complete slice cache (no manifest.json); run `mkd prepare` again")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            fail(manifest_path, f"corrupt manifest ({exc})")
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            fail(manifest_path, f"not an {FORMAT} manifest")
        if self.manifest.get("version") != VERSION:
            fail(manifest_path, f"cache format version {self.manifest.get('version')}, expected {VERSION}")
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
    def classes(self):
        """Class names, background first."""
        return list(self.manifest["classes"])

    @property
    def num_classes(self):
        return len(self.manifest["classes"])

    @property
    def size(self):
        return int(self.manifest["size"])

    def modality(self, role):
        """The manifest record of `"target"` or `"assistant"`."""
        return self.manifest["modalities"][role]

    def volumes(self, role, split=None):
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

    def images(self, role):
        """`(slices, size, size)` float32 preprocessed intensities."""
        return self._array(role, "images")

    def labels(self, role):
        """`(slices, size, size)` uint8 class indices (0 for unlabelled slices)."""
        return self._array(role, "labels")

    def slice_table(self, role):
        """`(slices, 4)` int32: volume index, slice index, split code, has_label."""
        return self._array(role, "slices")

    def indices(self, role, split=None, labelled=None):
        """Row indices of slices of ``role`` in ``split`` (and with/without labels)."""
        table = self.slice_table(role)
        keep = np.ones(len(table), bool)
        if split is not None:
            keep &= table[:, SPLIT] == SPLITS.index(split)
        if labelled is not None:
            keep &= table[:, HAS_LABEL] == int(bool(labelled))
        return np.flatnonzero(keep)
