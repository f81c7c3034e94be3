"""pudl.wire: what rank 0 sends the other ranks round-trips exactly and can only decode to data."""

import json
import struct

import numpy as np
import pytest

from pudl import wire
from pudl.domain import Candidate, Group, Pair, TrainJob
from pudl.prompts import Prompt
from pudl.recipe import TrainConfig


def test_a_training_job_round_trips_exactly():
    rng = np.random.default_rng()
    n = int(rng.integers(1, 30))
    cands = {"p1": [Candidate("p1", i, f"text {i} ✓", rng.integers(0, 50000, n).astype(np.int32),
                              rng.normal(size=n).astype(np.float32), "stop") for i in range(3)]}
    job = TrainJob(cfg=TrainConfig(algo="ldl", beta=float(rng.random())), algo="ldl", epochs=2,
                   pairs=[Pair("p1", "best-vs-worst", 0, 2, float(rng.random()))],
                   groups=[Group("p1", (-1, 0, 2), (0.5, -0.25, -1.0))],
                   refs={("p1", -1): rng.normal(size=(n,)).astype(np.float32), ("p1", 0): np.zeros((0,), np.float32)},
                   prompts={"p1": Prompt("p1", "Capital of Norway?", None, "Oslo")}, anchors={"p1": "Oslo."},
                   candidates=cands, seed=int(rng.integers(1000)), fingerprint="f" * 16)
    back = wire.decode(wire.encode(job))
    assert isinstance(back, TrainJob) and isinstance(back.cfg, TrainConfig)
    assert back.cfg == job.cfg and back.pairs == job.pairs and back.groups == job.groups
    assert (back.algo, back.epochs, back.seed, back.fingerprint) == (job.algo, 2, job.seed, job.fingerprint)
    assert back.prompts == job.prompts and back.anchors == job.anchors
    assert set(back.refs) == set(job.refs)
    for k, v in job.refs.items():
        assert back.refs[k].dtype == v.dtype and np.array_equal(back.refs[k], v)
    for a, b in zip(cands["p1"], back.candidates["p1"]):
        assert (a.prompt_id, a.idx, a.text, a.finish) == (b.prompt_id, b.idx, b.text, b.finish)
        assert np.array_equal(a.token_ids, b.token_ids) and b.token_ids.dtype == np.int32
        assert np.array_equal(a.logprobs, b.logprobs)


def test_plain_structures_round_trip():
    rng = np.random.default_rng()
    msg = {"none": None, "flag": True, "opt": [("m.lora_a", rng.normal(size=(4, 3)).astype(np.float32)),
                                               ("step", np.int64(7))]}
    back = wire.decode(wire.encode(msg))
    assert back["none"] is None and back["flag"] is True
    assert back["opt"][0][0] == "m.lora_a" and np.array_equal(back["opt"][0][1], msg["opt"][0][1])
    assert back["opt"][1] == ("step", 7)  # a NumPy scalar arrives as a plain number


def test_only_data_goes_in_and_comes_out():
    class Stranger:
        pass

    with pytest.raises(TypeError, match="cannot send"):
        wire.encode({"x": Stranger()})
    with pytest.raises(TypeError):
        wire.encode(np.array([Stranger()], dtype=object))  # object arrays are refused on the way in...
    header = json.dumps({"tree": {"~dc": "Popen", "fields": {"args": ["sh"]}}, "arrays": []}).encode()
    with pytest.raises(KeyError):  # ...and a message naming any class but pudl's own data is refused on the way out
        wire.decode(struct.pack("<Q", len(header)) + header)
    header = json.dumps({"tree": {"~nd": 0}, "arrays": [["|O", [1]]]}).encode()
    with pytest.raises(ValueError, match="object arrays"):
        wire.decode(struct.pack("<Q", len(header)) + header + b"\0" * 8)
