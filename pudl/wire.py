"""What rank 0 sends the other training ranks, as bytes that can only ever decode to data.

JSON for the structure, NumPy arrays as raw little-endian bytes after it, and dataclasses only from a fixed
list of pudl's own (the training job and what it holds: a recipe section, pairs, groups, prompts,
candidates): unlike a pickled message, nothing received can name a class or function to run.
"""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np

from pudl.domain import Candidate, Group, Pair, TrainJob
from pudl.prompts import Prompt
from pudl.recipe import TrainConfig


def _types() -> dict[str, type]:
    """The dataclasses a message may hold."""
    return {t.__name__: t for t in (Candidate, Pair, Group, Prompt, TrainConfig, TrainJob)}


def encode(obj) -> bytes:
    """Bytes for `obj`: None, bool, int, float, str, list, tuple, dict, NumPy arrays, pudl's listed dataclasses."""
    types, arrays = _types(), []

    def enc(x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            if x.dtype.hasobject:
                raise TypeError("pudl.wire cannot send an object array")
            arrays.append(np.ascontiguousarray(x))
            return {"~nd": len(arrays) - 1}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, tuple):
            return {"~tuple": [enc(v) for v in x]}
        if isinstance(x, dict):
            return {"~dict": [[enc(k), enc(v)] for k, v in x.items()]}
        name = type(x).__name__
        if dataclasses.is_dataclass(x) and types.get(name) is type(x):
            return {"~dc": name, "fields": {f.name: enc(getattr(x, f.name)) for f in dataclasses.fields(x)}}
        raise TypeError(f"pudl.wire cannot send a {type(x).__qualname__}")

    tree = enc(obj)
    header = json.dumps({"tree": tree, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}).encode()
    return struct.pack("<Q", len(header)) + header + b"".join(a.tobytes() for a in arrays)


def decode(data: bytes):
    """The object `encode` was given (arrays are copies, never views of `data`)."""
    types = _types()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    arrays, offset = [], 8 + n
    for dtype, shape in header["arrays"]:
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise ValueError("pudl.wire: object arrays are not data")
        count = int(np.prod(shape, dtype=np.int64))
        arrays.append(np.frombuffer(data, dt, count, offset).reshape(shape).copy())
        offset += count * dt.itemsize

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "~nd" in x:
            return arrays[x["~nd"]]
        if "~tuple" in x:
            return tuple(dec(v) for v in x["~tuple"])
        if "~dict" in x:
            return {_hashable(dec(k)): dec(v) for k, v in x["~dict"]}
        return types[x["~dc"]](**{k: dec(v) for k, v in x["fields"].items()})

    return dec(header["tree"])


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key
