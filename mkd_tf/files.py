"""Small file helpers every layer uses: atomic text writes and JSON reads that fail in one line."""

import json
import os
import uuid
from pathlib import Path

from mkd_tf.errors import fail


def write_text_atomic(path, text):
    """Write ``text`` to a hidden sibling of ``path``, then rename it into place (never half-written)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def read_json(path, missing="file not found"):
    """Parse a JSON file; a missing or invalid file is an :class:`MkdError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        fail(path, missing)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        fail(path, f"invalid JSON ({exc})")
