"""Files a reader never sees half written, and JSON that every strict parser accepts.

Every JSON file and line pudl writes goes through `dumps`: a figure that is undefined (NaN, e.g. an AUC over a
family with one class) or infinite becomes null, as `jq` and JavaScript's JSON.parse require.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from pudl.errors import UserError, write_failed


def atomic_save(path: Path, write: Callable[[str], None]):
    """Write through `write(tmp_path)` and rename into place, so readers never see half a file. A failed write
    (disk full: OSError, or MLX's RuntimeError "[write] Unable to write") keeps the previous file, removes the
    partial one and is one line naming the file."""
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    try:
        write(str(tmp))
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and "write" not in str(e).lower():
            raise
        raise UserError(write_failed(path, e)) from None
    os.replace(tmp, path)


def strict(value):
    """`value` with every non-finite float replaced by None, NumPy scalars and arrays as plain numbers and
    lists, tuples as lists; anything else JSON cannot hold becomes its str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if hasattr(value, "tolist"):  # NumPy scalars and arrays
        return strict(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return str(value)


def dumps(value, **kwargs) -> str:
    """Strict JSON text for `value` (see `strict`)."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def write_json(path: Path, data):
    """Write `data` as strict, indented JSON, atomically, readable by the user only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(dumps(data, indent=2))
    os.replace(tmp, path)
