"""File helpers every layer uses: the one atomic-write scheme, all-or-nothing writes, JSON reads.

Atomic writes: everything the package writes goes first to a **hidden temporary sibling**,
``.NAME.tmp-<8 hex>`` plus the name's suffixes (a tool that picks its format from the extension, such
as nibabel or matplotlib, still sees ``.nii.gz`` / ``.png``), and is renamed into place only when
complete, so a reader never sees a half-written file and a killed write leaves only a hidden
``.NAME.tmp-*`` that the next write of a folder cleans up. Folders (slice cache, phantom, export
version) use the same name for their staging folder.

Example:
    >>> name = temporary_sibling("out/case_1001_label.nii.gz").name
    >>> name[:21], len(name[21:29]), name[29:]
    ('.case_1001_label.tmp-', 8, '.nii.gz')
"""

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; a running writer's staging folder is then not protected
    fcntl = None

from mkd_tf.errors import fail


def temporary_sibling(path, folder=False):
    """A hidden, unique path next to ``path``: ``.STEM.tmp-<8 hex><suffixes>`` for a file (the suffixes kept
    for tools that read them), ``.NAME.tmp-<8 hex>`` for a ``folder`` (what stale-staging clean-ups match)."""
    path = Path(path)
    stem, dot, suffixes = (path.name, "", "") if folder else path.name.partition(".")
    return path.with_name(f".{stem}.tmp-{uuid.uuid4().hex[:8]}{dot}{suffixes}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling of ``path`` to write; on success rename it onto ``path``, on failure
    remove it (``path`` is then untouched)."""
    path = Path(path)
    temporary = temporary_sibling(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text_atomic(path, text):
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_files_atomic(files):
    """Write ``[(path, bytes), ...]`` all or nothing.

    Missing folders are created, each file goes to a temporary sibling (held under an exclusive ``flock``
    while it is staged, so :func:`remove_stale_staged_files` of a concurrent command leaves it alone), and
    only when every temporary is complete are they renamed into place, one after the other. If a later
    rename fails, the files this call already published are taken back: a path that did not exist before
    is removed, a path that held a file gets its previous content back (kept as a hard link
    ``.NAME.old-<8 hex>`` until the end). On failure the temporaries and the folders this call created are
    removed and :class:`~mkd_tf.errors.MkdError` names the file.
    """
    created, temporaries, locks, published, backups, done = [], [], [], [], [], False
    try:
        for path, content in files:
            _stage(Path(path), content, created, temporaries, locks)
        for (path, _), temporary in zip(files, temporaries):
            path = Path(path)
            try:
                backup = _keep_previous(path) if len(files) > 1 else None
                backups.append((path, backup))
                if backup is not None:  # locked: not a stale one for a concurrent clean-up
                    locks.append(os.open(backup, os.O_RDONLY))
                    with contextlib.suppress(OSError):
                        if fcntl is not None:
                            fcntl.flock(locks[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.replace(temporary, path)
                published.append(path)
            except OSError as exc:
                fail(path, f"cannot write ({exc.strerror or exc})")
        done = True
    finally:
        if not done:  # take back what this call published: the outputs appear together or not at all
            _take_back(published, dict(backups))
        for _, backup in backups:
            if backup is not None and backup.exists():
                backup.unlink()
        for temporary in temporaries:
            if temporary.exists():
                temporary.unlink()
        for descriptor in locks:
            os.close(descriptor)
        if not done:
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    pass


def _stage(path, content, created, temporaries, locks):
    """Write ``content`` to a new temporary sibling of ``path`` held under an exclusive ``flock``, creating the
    missing folders; appends what it made to ``created``, ``temporaries`` and ``locks`` (for the clean-up)."""
    missing, folder = [], path.parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        temporary = temporary_sibling(path)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        temporaries.append(temporary)
        locks.append(descriptor)
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with os.fdopen(os.dup(descriptor), "wb") as handle:
            handle.write(content)
    except OSError as exc:
        fail(path, f"cannot write ({exc.strerror or exc})")


def _take_back(published, previous):
    """Undo the renames into ``published`` paths: the previous content (``previous[path]``, a backup) back,
    or the path removed when there was none."""
    for path in reversed(published):
        try:
            if previous.get(path) is not None:
                os.replace(previous[path], path)
            else:
                path.unlink()
        except OSError:
            pass


def _keep_previous(path):
    """A hard link ``.NAME.old-<8 hex>`` to the file at ``path`` (`None` if there is none), so that a failed
    all-or-nothing write can put it back; a copy where the file system has no hard links."""
    if path.is_symlink() or not path.is_file():
        return None
    stem, dot, suffixes = path.name.partition(".")
    backup = path.with_name(f".{stem}.old-{uuid.uuid4().hex[:8]}{dot}{suffixes}")
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)
    return backup


def remove_stale_staged_files(path, kinds=("tmp", "old")):
    """Delete the hidden files a killed all-or-nothing write of the file ``path`` left next to it.

    Only regular files (not links, not folders) named exactly ``.STEM.tmp-<8 hex>SUFFIXES`` (the
    temporaries of :func:`temporary_sibling`) or ``.STEM.old-<8 hex>SUFFIXES`` (the previous content kept by
    :func:`write_files_atomic`) for ``path``'s own name, that no running writer holds locked, are removed.
    Returns the removed paths.

    Example:
        >>> stale = temporary_sibling("labels.nii.gz")
        >>> _ = stale.write_bytes(b"half a file")
        >>> [p.name == stale.name for p in remove_stale_staged_files("labels.nii.gz")]
        [True]
    """
    path = Path(path)
    stem, dot, suffixes = path.name.partition(".")
    pattern = re.compile(rf"^\.{re.escape(stem)}\.({'|'.join(kinds)})-[0-9a-f]{{8}}{re.escape(dot + suffixes)}$")
    removed = []
    try:
        candidates = sorted(p for p in path.parent.iterdir() if pattern.match(p.name))
    except OSError:
        return removed
    for candidate in candidates:
        if candidate.is_symlink() or not candidate.is_file():
            continue
        try:
            descriptor = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            if fcntl is not None:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            candidate.unlink()
            removed.append(candidate)
        except OSError:  # locked: a running writer's temporary
            continue
        finally:
            os.close(descriptor)
    return removed


def lock_folder(folder):
    """An open descriptor holding an exclusive ``flock`` on ``folder``; `None` if another process holds one.

    A writer holds it on its staging folder while it writes, so :func:`remove_stale_staging` of a
    concurrent command never deletes a folder that is still being written. Close the descriptor to release.
    """
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    if fcntl is not None:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            return None
    return descriptor


def remove_stale_staging(folder, holds_only_ours, kinds=("tmp",)):
    """Delete the ``.NAME.tmp-<8 hex>`` folders (and ``.NAME.old-*`` with ``kinds=("tmp", "old")``) that a
    killed write of ``folder`` left next to it.

    Only folders matching exactly that pattern for ``folder``'s own name, for which
    ``holds_only_ours(candidate)`` is true (what the writer itself would have put there) and that no running
    writer has locked (:func:`lock_folder`) are removed, so nothing the project did not create is touched.
    Returns the removed paths.
    """
    folder = Path(folder)
    pattern = re.compile(rf"^\.{re.escape(folder.name)}\.({'|'.join(kinds)})-[0-9a-f]{{8}}$")
    removed = []
    try:
        candidates = sorted(p for p in folder.parent.iterdir() if pattern.match(p.name))
    except OSError:
        return removed
    for candidate in candidates:
        if candidate.is_symlink() or not candidate.is_dir():
            continue
        try:
            if not holds_only_ours(candidate):
                continue
        except OSError:
            continue
        descriptor = lock_folder(candidate)
        if descriptor is None:  # a running writer's staging folder
            continue
        try:
            shutil.rmtree(candidate, ignore_errors=True)
        finally:
            os.close(descriptor)
        if not candidate.exists():
            removed.append(candidate)
    return removed


def nearest_existing(path):
    """``path`` or its nearest ancestor that exists (a dangling symlink counts: it blocks creation too)."""
    path = Path(path)
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def check_parent_is_folder(path, action):
    """Refuse, before anything is written, a ``path`` that cannot be created because its nearest existing
    ancestor is not a folder: ``PATH: cannot ACTION: ANCESTOR is a file, not a folder``. Returns that
    ancestor (the folder ``path`` would be created in, or its nearest existing parent).

    Example:
        >>> _ = Path("notes.txt").write_text("mine")
        >>> check_parent_is_folder("notes.txt/run", "create the run folder")
        Traceback (most recent call last):
        mkd_tf.errors.MkdError: notes.txt/run: cannot create the run folder: notes.txt is a file, not a folder
    """
    existing = nearest_existing(Path(path).parent)
    if not existing.is_dir():
        kind = "a broken link" if existing.is_symlink() and not existing.exists() else "a file"
        fail(path, f"cannot {action}: {existing} is {kind}, not a folder")
    return existing


def read_json(path, missing="file not found"):
    """Parse a JSON file; a missing, unreadable or invalid file is an :class:`MkdError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        fail(path, missing)
    except IsADirectoryError:
        fail(path, "is a folder, not a JSON file")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        fail(path, f"invalid JSON ({exc})")
