"""pudl.atomic_files: strict JSON (undefined figures are null) and writes a reader never sees half done."""

import math

import numpy as np
import pytest

from pudl.atomic_files import atomic_save, dumps, write_json
from pudl.errors import UserError
from tests.conftest import strict_json


def test_undefined_figures_become_null_and_the_text_is_strict_json(tmp_path):
    rng = np.random.default_rng()
    x = float(rng.normal())
    data = {"auc": float("nan"), "spearman": np.float64("nan"), "ratio": float("inf"), "ok": x,
            "by_family": {"capitals": {"auc": math.nan, "n": np.int64(3)}}, "pair": (1, np.float32(0.5)),
            "array": np.array([1.0, np.nan]), ("a", 1): "tuple key"}
    back = strict_json(dumps(data))
    assert back["auc"] is None and back["spearman"] is None and back["ratio"] is None and back["ok"] == x
    assert back["by_family"] == {"capitals": {"auc": None, "n": 3}}
    assert back["pair"] == [1, 0.5] and back["array"] == [1.0, None] and back["('a', 1)"] == "tuple key"
    write_json(tmp_path / "s.json", data)
    assert strict_json((tmp_path / "s.json").read_text())["auc"] is None


def test_the_strict_parser_refuses_what_python_writes_by_default():
    import json

    with pytest.raises(ValueError, match="NaN"):
        strict_json(json.dumps({"auc": float("nan")}))


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "a.bin"
    atomic_save(path, lambda p: open(p, "wb").write(b"first"))

    def fail(p):
        open(p, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="a.bin"):
        atomic_save(path, fail)
    assert path.read_bytes() == b"first" and list(tmp_path.iterdir()) == [path]
