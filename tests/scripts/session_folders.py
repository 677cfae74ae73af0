"""Folders built once per test session and shared by all pytest-xdist workers (trained runs, caches).

`make test` runs ``-n 2 --dist loadfile``: each worker is its own process with its own session fixtures,
so a run that test files on both workers need was trained twice (the export runs, ~90 s each time on
2 cores). :func:`shared_folder` builds such a folder once, in the folder common to the session's
workers, under a file lock: a worker that needs it while the other builds it waits, then reads it.
Shared folders are read-only for tests, as the session fixtures were.
"""

import fcntl
import os
import shutil
from pathlib import Path


def session_root(tmp_path_factory):
    """The temporary folder common to every worker of this session (`pytest-N/`), or the session's own."""
    base = Path(tmp_path_factory.getbasetemp())
    # Under xdist each worker's base is `pytest-N/popen-gwK`; without xdist the base is `pytest-N` itself.
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_folder(tmp_path_factory, name, build):
    """Folder ``name`` of the session, made by ``build(folder)`` in the first process that asks for it.

    Args:
        tmp_path_factory: pytest's session fixture.
        name: the folder's name, unique in the session.
        build: ``callable(folder)`` that fills ``folder`` (it need not exist yet).

    Returns:
        `(folder, built)`: the folder, and whether this process built it (False: another worker did).
    """
    root = session_root(tmp_path_factory) / "shared"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if build raises
        if done.exists():
            return folder, False
        if folder.exists():  # left by a worker whose build failed: start over
            shutil.rmtree(folder)
        build(folder)
        done.touch()
    return folder, True
