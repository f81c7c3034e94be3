"""Data-parallel training: 2 ranks started by `mlx.launch` (ring backend over TCP on 127.0.0.1) train the same
adapter, with the same per-step losses, as 1 process with the doubled batch.

Run as a script (`python tests/test_distributed.py GGUF OUT SEED BATCH`) this file is what every rank runs.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")  # mlx's console script, next to this interpreter
ALGOS = ("dpo", "ldl")
N_PROMPTS, K, EPOCHS = 5, 3, 2  # 5 items in global batches of 4: a full batch, then one a rank gets nothing of


def train_here(gguf: str, out: Path, seed: int, batch_size: int) -> dict:
    """Build fresh random preference data from `seed` and train each of ALGOS on this rank's slices; write
    this rank's losses and LoRA tensors to out/rank-R.npz and return them."""
    from pudl.domain import Candidate, Pair
    from pudl.distributed import init_world
    from pudl.losses import LOSSES
    from pudl.models import Tokenizer, load_student
    from pudl.prefs import Completions, dpo_batches, group_batches, make_groups, needed_references
    from pudl.prompts import Prompt
    from pudl.recipe import TrainConfig
    from pudl.sequences import completion_logprobs
    from pudl.train import train

    world = init_world()
    rng = np.random.default_rng(seed)
    tok = Tokenizer(Path(gguf))
    prompts = [Prompt(f"p{i}", f"Question {i}: what is {rng.integers(100)}?") for i in range(N_PROMPTS)]
    anchors = {p.id: f"It is {rng.integers(100)}." for p in prompts}
    cands = {p.id: [Candidate(p.id, j, "", rng.integers(100, 5000, rng.integers(3, 9)).astype(np.int32),
                              np.zeros(1, np.float32), "length") for j in range(K)] for p in prompts}
    scores = {p.id: rng.normal(size=K).tolist() for p in prompts}
    comp = Completions({p.id: p for p in prompts}, anchors, cands, tok)
    pairs = [Pair(p.id, "best-vs-worst", int(np.argmax(scores[p.id])), int(np.argmin(scores[p.id])), 1.0)
             for p in prompts]
    groups = make_groups(prompts, scores, {p.id: 2.0 for p in prompts}, include_anchor=True)
    result = {"size": np.array(world.size)}
    for algo in ALGOS:
        student = load_student(Path(gguf), 4, 8.0, ["q_proj", "v_proj", "down_proj"], seed=seed)
        result.update({f"{algo}/init/{k}": np.array(v) for k, v in student.lora_state().items()})
        keys = needed_references(algo, pairs, groups)
        refs = dict(zip(keys, completion_logprobs(student, [comp.sequence(*k) for k in keys], adapter=False)))
        cfg = TrainConfig(algo=algo, learning_rate=5e-3, epochs=EPOCHS, batch_size=batch_size, beta=0.5)
        if algo == "dpo":
            batches, _ = dpo_batches(pairs, refs, comp, cfg, seed, world.shard)
        else:
            batches, _ = group_batches(groups, refs, comp, cfg, seed, world.shard)
        losses = []
        train(student, batches, LOSSES[algo], cfg, checkpoint_dir=out / f"ckpt-{algo}-{world.rank}",
              fingerprint="d", on_step=lambda step, row: losses.append(row["loss"]), world=world)
        result[f"{algo}/losses"] = np.array(losses)
        result.update({f"{algo}/lora/{k}": np.array(v) for k, v in student.lora_state().items()})
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"rank-{world.rank}.npz", **result)
    return result


def weights_agree(two: dict, one: dict, keys: list[str]) -> float:
    """|two - one| / |one - init| over all LoRA tensors: the gap relative to how far training moved them.
    (Elementwise tolerances do not fit Adam: a weight whose gradient is ~0 takes a ~learning-rate step whose
    sign float rounding decides, so a rare element differs by a fraction of the learning rate.)"""
    gap = sum(float(((two[k] - one[k]).astype(np.float64) ** 2).sum()) for k in keys)
    moved = sum(float(((one[k] - one[k.replace("lora/", "init/", 1)]).astype(np.float64) ** 2).sum()) for k in keys)
    assert moved > 1e-4, "training did not move the adapter: agreeing would be trivial"
    return (gap / moved) ** 0.5


def free_port_pair() -> int:
    """A port p with p and p + 1 free now (mlx.launch gives rank r port start + r)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 1 < 65536:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free pair of ports on 127.0.0.1")


def launch(n: int, command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`mlx.launch` n ranks of `command` on 127.0.0.1 with the ring backend (killed at the timeout, no hang)."""
    cmd = [str(LAUNCH), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(n),
           "--starting-port", str(free_port_pair()), "--cwd", str(ROOT), "--", *command]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_only_a_launcher_with_several_ranks_makes_a_world(tmp_path, monkeypatch):
    from pudl.distributed import launched

    for key in ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert not launched()  # a plain process: no collective is ever called
    hostfile = tmp_path / "hosts"
    hostfile.write_text("")  # what `mlx.launch -n 1` writes
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    assert not launched()
    hostfile.write_text('[["127.0.0.1:5000"], ["127.0.0.1:5001"]]')
    assert launched()
    monkeypatch.delenv("MLX_RANK")
    monkeypatch.delenv("MLX_HOSTFILE")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert launched()


def test_rank_slices_partition_every_global_batch():
    """Over random sizes the ranks' slices of a step are the 1-process batch of size x batch_size items, in order;
    every rank has the same number of steps; an empty slice is a weight-0 placeholder."""
    from pudl.prefs import _rank_slices
    from pudl.recipe import TrainConfig

    rng = np.random.default_rng()
    for _ in range(30):
        n, b, size, epochs = int(rng.integers(1, 40)), int(rng.integers(1, 6)), int(rng.integers(2, 5)), 2
        items, seed = list(range(100, 100 + n)), int(rng.integers(1 << 30))
        whole = list(_rank_slices(items, TrainConfig(batch_size=b * size, epochs=epochs), seed, (0, 1)))
        per_rank = [list(_rank_slices(items, TrainConfig(batch_size=b, epochs=epochs), seed, (r, size)))
                    for r in range(size)]
        assert all(len(steps) == len(whole) for steps in per_rank)
        for step, (batch, weight) in enumerate(whole):
            assert weight == len(batch)
            parts = [per_rank[r][step] for r in range(size)]
            assert [x for chunk, w in parts if w for x in chunk] == batch
            assert all(w in (0, len(chunk)) and (w or len(chunk) == 1) for chunk, w in parts)
            assert all(w <= b for _, w in parts)


def test_two_ranks_train_what_one_rank_trains_with_the_doubled_batch(tiny_gguf_f32, tmp_path):
    seed, b = int(np.random.default_rng().integers(1 << 30)), 2
    proc = launch(2, [sys.executable, str(Path(__file__)), str(tiny_gguf_f32), str(tmp_path / "two"), str(seed),
                      str(b)])
    assert proc.returncode == 0 and "exited with code" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [dict(np.load(tmp_path / "two" / f"rank-{r}.npz")) for r in range(2)]
    assert int(ranks[0]["size"]) == int(ranks[1]["size"]) == 2  # really two processes, not two worlds of one

    one = train_here(str(tiny_gguf_f32), tmp_path / "one", seed, 2 * b)
    assert int(one["size"]) == 1
    for algo in ALGOS:
        losses = one[f"{algo}/losses"]
        assert len(losses) == EPOCHS * 2 and np.all(np.isfinite(losses))
        for r in range(2):  # every rank saw the averaged loss of the global batch
            np.testing.assert_allclose(ranks[r][f"{algo}/losses"], losses, rtol=2e-4, atol=1e-5, err_msg=algo)
        keys = [k for k in one if k.startswith(algo + "/lora/")]
        for key in keys:
            np.testing.assert_array_equal(ranks[1][key], ranks[0][key], err_msg=key)  # the ranks stay identical
        assert weights_agree(ranks[0], one, keys) < 1e-2, algo
    assert not list((tmp_path / "two").glob("ckpt-*-1"))  # rank 1 writes no checkpoint
    assert (tmp_path / "two" / "ckpt-dpo-0" / "checkpoint.json").exists()


def write_recipe(tmp_path: Path, name: str, model: Path, batch_size: int, seed: int, quant: str = "q8_0") -> Path:
    from tests import recipe_files  # here, not at the top: this file also runs as a script under mlx.launch

    return recipe_files.write_recipe(tmp_path, {
        "run": {"out": tmp_path / name, "seed": seed},
        "student": {"model": model, "quant": quant, "n_ctx": 256, "threads": 1},
        "sample": {"k": 3, "max_tokens": 10},
        "train": {"epochs": 2, "batch_size": batch_size, "learning_rate": 5e-3},
        "lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}}, prompts=4, name=name)


def step_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "step"]


def test_pudl_run_under_mlx_launch_matches_one_process(tmp_path, monkeypatch):
    """`mlx.launch -n 2 -- pudl run` on the cache of a 1-process run with the doubled batch: rank 0 reuses the
    cached preferences, both ranks train, and the adapter and per-step losses are the 1-process ones. The
    student is a Hugging Face directory converted with student.quant = f16: every rank must train on those
    weights (a rank that converted it with the default q8_0 would compute other losses)."""
    from tests.hf_tiny import write_tiny_hf

    seed = int(np.random.default_rng().integers(1 << 20))
    monkeypatch.setenv("PUDL_CACHE_DIR", str(tmp_path / "gguf-cache"))  # the subprocesses inherit it
    hf = write_tiny_hf(tmp_path / "hf", "llama", seed=seed)
    one = write_recipe(tmp_path, "one", hf, 4, seed, quant="f16")
    proc = subprocess.run([sys.executable, "-m", "pudl.cli", "run", str(one), "--quiet"], capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = write_recipe(tmp_path, "two", hf, 2, seed, quant="f16")
    (tmp_path / "two").mkdir()
    shutil.copyfile(tmp_path / "one" / "cache.sqlite", tmp_path / "two" / "cache.sqlite")
    proc = launch(2, [sys.executable, "-m", "pudl.cli", "run", str(two), "--quiet"], timeout=600)
    assert proc.returncode == 0 and "exited with code" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["stages"]["1"] == {"sample": "reused", "score": "reused", "prefs": "reused", "train": "recomputed"}
    assert summary["ranks"] == 2 and proc.stdout.count("run finished") == 1  # rank 0 reports, rank 1 trains

    from mlx.core import load

    from pudl.models import load_student, resolve_model_path

    f16 = resolve_model_path(str(hf), "f16")
    init = load_student(f16, 4, 16.0, ["q_proj", "v_proj"], seed=seed).lora_state()  # the recipe's LoRA
    w1, w2 = ({"lora/" + k: np.array(v) for k, v in load(str(tmp_path / d / "round-1" / "adapter.safetensors")).items()}
              for d in ("one", "two"))
    assert w1.keys() == w2.keys() == {"lora/" + k for k in init}
    w1.update({"init/" + k: np.array(v) for k, v in init.items()})
    assert weights_agree(w2, w1, list(w2)) < 1e-2
    losses = step_losses(tmp_path / "one")
    assert len(losses) >= 2
    np.testing.assert_allclose(step_losses(tmp_path / "two"), losses, rtol=2e-4, atol=1e-5)


if __name__ == "__main__":
    gguf, out, seed, batch = sys.argv[1:5]
    train_here(gguf, Path(out), int(seed), int(batch))
