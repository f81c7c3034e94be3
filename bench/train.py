"""One LoRA-DPO epoch on the same pairs: pudl vs mlx-lm-lora's DPO vs TRL DPOTrainer + PEFT (torch CPU), in one run.

Pairs: the first P prompts of recipes/data/tasks-train.jsonl in the student's chat template; chosen = the
prompt's reference answer, rejected = the next prompt's answer (short, like the demo's pairs). Every peer gets
the same pairs, LoRA (rank 8, alpha 16, all seven linear projections, no dropout), beta 0.1, AdamW lr 1e-4,
batch 4 pairs, max length 256, one epoch, on the same weights: pudl trains its MLX student from the
SmolLM2-135M Q4_1 GGUF (dequantized to float32); the peers load an HF directory written from that GGUF
(pudl.hfdir.write_hf_dir: the same float32 values).
  pudl         reference log-probs (adapter off, computed once) + pudl.train.train with the dpo loss
  pudl_quantized  the same with `student.weights = "quantized"` (base weights kept 4-bit, dequantized at use)
  pudl_no_recompute  the same with `train.recompute = false` (every layer's activations kept for the backward
               pass instead of recomputed there: faster steps, more memory)
  mlx_lm_lora  mlx_lm_lora.trainer.dpo_trainer.train_dpo (a frozen reference model forward every step), the
               prompt/answer token ids pudl uses; its batches are drawn at random, P/4 of them
  trl          trl.DPOTrainer with a peft LoraConfig on torch CPU (reference = the adapter disabled)
tokens/s = the epoch's tokens (prompt + completion, chosen and rejected, pudl's tokenization: the same count for
every peer) over the wall seconds of the epoch, model loading excluded and the first step's compile included.
Each peer runs in its own subprocess (its own peak RSS); a peer whose package is missing gets null fields and
the reason (`pip install -e ".[bench]"`). mlx-lm-lora 5.10 reads mx.device_info()['max_recommended_working_set_size'],
a key only Metal has: its subprocess (only) gets the key.
Run: `python -m pudl.bench.train [--pairs 32 --threads N --profile]` or `pudl bench train`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from pudl.atomic_files import dumps
from pudl.bench import common

PEERS = ("pudl", "pudl_quantized", "pudl_no_recompute", "mlx_lm_lora", "trl")
VARIANTS = {"pudl_quantized": ("quantized", "student.weights=quantized"),  # pudl with one setting changed
            "pudl_no_recompute": ("no_recompute", "train.recompute=false")}
PEER_PACKAGES = {"pudl": [], "pudl_quantized": [], "pudl_no_recompute": [], "mlx_lm_lora": ["mlx_lm_lora"],
                 "trl": ["trl", "peft", "torch", "datasets"]}
TASKS = Path(__file__).resolve().parent.parent / "recipes" / "data" / "tasks-train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = {"rank": 8, "alpha": 16.0, "beta": 0.1, "learning_rate": 1e-4, "batch_size": 4, "max_seq_len": 256}


def make_pairs(n: int, out: Path) -> dict:
    """Write the pairs (texts and pudl's token ids) to `out` as JSON; return it."""
    from pudl.models import Tokenizer, resolve_model_path
    from pudl.prompts import chat_messages, load_prompts

    prompts = load_prompts(TASKS)
    if n > len(prompts):
        raise ValueError(f"--pairs {n}: {TASKS.name} has {len(prompts)} prompts")
    tok = Tokenizer(resolve_model_path("smollm2-135m"))
    pairs = []
    for i, p in enumerate(prompts[:n]):
        rejected = prompts[(i + 1) % len(prompts)].answer
        messages = chat_messages(p)
        pairs.append({"id": p.id, "messages": messages, "chosen": p.answer, "rejected": rejected,
                      "prompt_ids": tok.chat_tokens(messages), "chosen_ids": tok.answer_tokens(p.answer),
                      "rejected_ids": tok.answer_tokens(rejected)})
    data = {"pairs": pairs, "tokens": sum(2 * len(q["prompt_ids"]) + len(q["chosen_ids"]) + len(q["rejected_ids"])
                                          for q in pairs)}
    out.write_text(dumps(data))
    return data


def run(tiny: bool = False, n_pairs: int = 32, threads: int = 0, profile: bool = False,
        peers: tuple[str, ...] = PEERS) -> dict:
    """Write the pairs and the HF directory, run each peer in a subprocess, compare tokens/s and peak memory."""
    from pudl.hfdir import write_hf_dir
    from pudl.models import resolve_model_path

    if tiny:  # seconds-long smoke size: one step of 4 pairs
        n_pairs = 4
    if n_pairs < SETTINGS["batch_size"] or n_pairs % SETTINGS["batch_size"]:
        raise ValueError(f"pairs must be a multiple of the batch size {SETTINGS['batch_size']}")
    threads = threads or os.cpu_count()
    machine = common.machine(measure=not tiny)
    runs, reasons = {}, {}
    with tempfile.TemporaryDirectory(prefix="pudl-bench-train-") as work:
        work = Path(work)
        data = make_pairs(n_pairs, work / "pairs.json")
        hf_dir = None
        for peer in peers:
            missing = [m for m in PEER_PACKAGES[peer] if not _importable(m)]
            if missing:
                runs[peer], reasons[peer] = None, f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"
                continue
            if peer in ("mlx_lm_lora", "trl") and hf_dir is None:
                hf_dir = write_hf_dir(resolve_model_path("smollm2-135m"), work / "hf")
            args = ["--peer", peer, "--work", str(work), "--threads", str(threads)] + (["--profile"] if profile else [])
            try:
                runs[peer] = common.run_peer("pudl.bench.train", args, common.thread_env(threads))
            except RuntimeError as e:  # a peer that breaks is reported, not fatal: pudl's figures still count
                runs[peer], reasons[peer] = None, str(e)[-1500:]
    rate = {p: (runs[p]["tokens"] / runs[p]["seconds"] if runs.get(p) else None) for p in PEERS}
    mem = {p: (runs[p]["peak_rss_bytes"] if runs.get(p) else None) for p in PEERS}
    result = {
        "pairs": n_pairs, "steps": n_pairs // SETTINGS["batch_size"], "tokens": data["tokens"], "threads": threads,
        **SETTINGS, "targets": TARGETS, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
        **{f"{p}_tok_s": rate[p] for p in PEERS},
        **{f"{p}_seconds_per_step": (runs[p]["seconds"] / (n_pairs // SETTINGS["batch_size"]) if runs.get(p) else None)
           for p in PEERS},
        "ratio_vs_mlx_lm_lora": common.ratio(rate["pudl"], rate["mlx_lm_lora"]),
        **{f"{short}_ratio_vs_mlx_lm_lora": common.ratio(rate[p], rate["mlx_lm_lora"])
           for p, (short, _) in VARIANTS.items()},
        **{f"{short}_memory_ratio_vs_mlx_lm_lora": common.ratio(mem[p], mem["mlx_lm_lora"])
           for p, (short, _) in VARIANTS.items()},
        "ratio_vs_trl": common.ratio(rate["pudl"], rate["trl"]),
        **{f"{p}_peak_memory_bytes": mem[p] for p in PEERS},
        "memory_ratio_vs_mlx_lm_lora": common.ratio(mem["pudl"], mem["mlx_lm_lora"]),
        "memory_ratio_vs_trl": common.ratio(mem["pudl"], mem["trl"]),
        "skipped": reasons, "runs": runs, "machine": machine, "n_params": common.n_params(),
    }
    lora_params = runs["pudl"]["lora_params"] if runs.get("pudl") else 0
    common.add_ceiling(result, "train", result["n_params"] + lora_params)
    return common.finish(result)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def lines(result: dict) -> list[str]:
    """The human-readable summary."""
    fmt, mib = common.fmt, common.mib
    out = [f"one LoRA-DPO epoch: {result['pairs']} pairs, {result['batch_size']} per step, r{result['rank']} on "
           f"{len(result['targets'])} projections, {result['tokens']} tokens, {result['threads']} threads"]
    for p in PEERS:
        if result[f"{p}_tok_s"] is None:
            out.append(f"  {p:<15} skipped: {result['skipped'].get(p, '?').splitlines()[0]}")
            continue
        out.append(f"  {p:<15} {result[f'{p}_tok_s']:7.1f} tok/s  {result[f'{p}_seconds_per_step']:6.2f} s/step"
                   f"  peak memory {mib(result[f'{p}_peak_memory_bytes'])}")
    out.append(f"  pudl vs mlx-lm-lora {fmt(result['ratio_vs_mlx_lm_lora'], '.2f')}x (memory "
               f"{fmt(result['memory_ratio_vs_mlx_lm_lora'], '.2f')}x), vs TRL {fmt(result['ratio_vs_trl'], '.2f')}x "
               f"(memory {fmt(result['memory_ratio_vs_trl'], '.2f')}x)")
    for short, setting in VARIANTS.values():
        out.append(f"  pudl ({setting}) vs mlx-lm-lora {fmt(result[f'{short}_ratio_vs_mlx_lm_lora'], '.2f')}x"
                   f" (memory {fmt(result[f'{short}_memory_ratio_vs_mlx_lm_lora'], '.2f')}x)")
    if result.get("train_ceiling_tok_s"):
        out.append(f"  sgemm {result['machine']['sgemm_gflops']} GFLOP/s -> training ceiling "
                   f"{result['train_ceiling_tok_s']:.0f} tok/s (6 FLOPs/parameter/token); "
                   f"pudl reaches {fmt(result['pudl_fraction_of_ceiling'], '.0%')}")
    out.append("  machine: " + common.machine_line(result["machine"]))
    return out


def plot(result: dict, path: Path) -> Path | None:
    names = {"pudl": "pudl", "pudl_quantized": "pudl (quantized)", "pudl_no_recompute": "pudl (no recompute)",
             "mlx_lm_lora": "mlx-lm-lora", "trl": "TRL+PEFT"}
    mem = {names[p]: (result[f"{p}_peak_memory_bytes"] or 0) / 2**20 or None for p in PEERS}
    return common.plot_bars(path, f"pudl bench train: one LoRA-DPO epoch, {result['pairs']} pairs", {
        "tokens/s (higher is better)": {names[p]: result[f"{p}_tok_s"] for p in PEERS},
        "peak memory MiB (lower is better)": mem}, common.machine_line(result["machine"]))


# ---- the peers, each in its own process -------------------------------------------------------------------

def _peer(peer: str, work: Path, threads: int, profile: bool) -> dict:
    from pudl.hardware import peak_memory_bytes

    data = json.loads((work / "pairs.json").read_text())
    prepare = {"pudl": _pudl, "pudl_quantized": functools.partial(_pudl, weights="quantized"),
               "pudl_no_recompute": functools.partial(_pudl, recompute=False),
               "mlx_lm_lora": _mlx_lm_lora, "trl": _trl}[peer]
    epoch, extra = prepare(data["pairs"], work, threads)  # loads the model; epoch() runs the timed epoch
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler()
        profiler.start()
    start = time.perf_counter()
    epoch()
    seconds = time.perf_counter() - start
    if profiler:
        profiler.stop()
        (work / f"profile-{peer}.txt").write_text(profiler.output_text(unicode=False, color=False, show_all=False))
        extra["profile"] = profiler.output_text(unicode=False, color=False)[:20000]
    return {"peer": peer, "tokens": data["tokens"], "seconds": seconds, "peak_rss_bytes": peak_memory_bytes(), **extra}


def _pudl(pairs: list[dict], work: Path, threads: int, weights: str = "auto", recompute: bool = True):
    import numpy as np

    from pudl.domain import ANCHOR_IDX, Candidate, Pair
    from pudl.losses import LOSSES
    from pudl.models import Tokenizer, load_student, resolve_model_path
    from pudl.prefs import Completions, dpo_batches
    from pudl.prompts import Prompt
    from pudl.recipe import TrainConfig
    from pudl.sequences import completion_logprobs
    from pudl.train import train

    path = resolve_model_path("smollm2-135m")
    student = load_student(path, SETTINGS["rank"], SETTINGS["alpha"], TARGETS, weights=weights)
    cfg = TrainConfig(algo="dpo", beta=SETTINGS["beta"], learning_rate=SETTINGS["learning_rate"], epochs=1,
                      batch_size=SETTINGS["batch_size"], max_seq_len=SETTINGS["max_seq_len"], recompute=recompute)
    # The pairs as the loop has them: chosen = the anchor, rejected = candidate 0 (its token ids as given).
    prompts = {q["id"]: Prompt(q["id"], q["messages"][-1]["content"]) for q in pairs}
    anchors = {q["id"]: q["chosen"] for q in pairs}
    cands = {q["id"]: [Candidate(q["id"], 0, q["rejected"], np.array(q["rejected_ids"], np.int32),
                                 np.zeros(len(q["rejected_ids"]), np.float32), "stop")] for q in pairs}
    comp = Completions(prompts, anchors, cands, Tokenizer(path))
    keys = [(q["id"], i) for q in pairs for i in (ANCHOR_IDX, 0)]
    for key, q in zip(keys[::2], pairs):  # the same token ids the peers get
        assert comp.sequence(*key) == (q["prompt_ids"], q["chosen_ids"])
    lora_params = sum(v.size for v in student.lora_state().values())

    def epoch():
        refs = dict(zip(keys, completion_logprobs(student, [comp.sequence(*k) for k in keys], adapter=False)))
        todo = [Pair(q["id"], "anchor", ANCHOR_IDX, 0, None) for q in pairs]
        batches, skipped = dpo_batches(todo, refs, comp, cfg, seed=0)
        assert not skipped
        done = train(student, batches, LOSSES["dpo"], cfg, checkpoint_dir=work / f"pudl-{weights}-{recompute}-ckpt",
                     fingerprint="bench", checkpoint_every=10**9)
        info["steps_trained"] = done.steps - done.resumed_from  # a stale checkpoint would skip the epoch

    info = {"lora_params": lora_params}
    return epoch, info


def _mlx_lm_lora(pairs: list[dict], work: Path, threads: int):
    import mlx.core as mx

    if "max_recommended_working_set_size" not in mx.device_info():  # only Metal reports it (mlx-lm-lora 5.10)
        device_info = mx.device_info
        mx.device_info = lambda *a, **k: {"max_recommended_working_set_size": 0, **device_info(*a, **k)}
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    model, _ = load(str(work / "hf"))
    ref_model, _ = load(str(work / "hf"))
    ref_model.freeze()
    model.freeze()
    keys = [f"self_attn.{t}" for t in TARGETS[:4]] + [f"mlp.{t}" for t in TARGETS[4:]]
    linear_to_lora_layers(model, len(model.layers), {"rank": SETTINGS["rank"], "dropout": 0.0, "keys": keys,
                                                     "scale": SETTINGS["alpha"] / SETTINGS["rank"]})
    dataset = [{"chosen": q["prompt_ids"] + q["chosen_ids"], "rejected": q["prompt_ids"] + q["rejected_ids"],
                "chosen_prompt_length": len(q["prompt_ids"]), "rejected_prompt_length": len(q["prompt_ids"])}
               for q in pairs]
    steps = len(pairs) // SETTINGS["batch_size"]
    args = DPOTrainingArgs(batch_size=SETTINGS["batch_size"], iters=steps, max_seq_length=SETTINGS["max_seq_len"],
                           beta=SETTINGS["beta"], steps_per_report=steps, steps_per_eval=10**9,
                           steps_per_save=10**9, adapter_file=str(work / "mlx-lm-lora-adapters.safetensors"))
    optimizer = optim.AdamW(learning_rate=SETTINGS["learning_rate"], weight_decay=0.0)

    def epoch():
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines would break the JSON last line
            train_dpo(model, ref_model, optimizer, dataset, None, args=args)

    return epoch, {}


def _trl(pairs: list[dict], work: Path, threads: int):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    hf = str(work / "hf")
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    dataset = Dataset.from_list([{"prompt": q["messages"], "chosen": [{"role": "assistant", "content": q["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": q["rejected"]}]} for q in pairs])
    config = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=SETTINGS["batch_size"],
                       num_train_epochs=1, learning_rate=SETTINGS["learning_rate"], beta=SETTINGS["beta"],
                       max_length=SETTINGS["max_seq_len"], lr_scheduler_type="constant", weight_decay=0.0,
                       warmup_steps=0, save_strategy="no", report_to=[], logging_steps=10**6, use_cpu=True,
                       bf16=False, fp16=False, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    peft = LoraConfig(r=SETTINGS["rank"], lora_alpha=SETTINGS["alpha"], lora_dropout=0.0, target_modules=TARGETS,
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft)

    def epoch():
        trainer.train()

    return epoch, {}


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="pyinstrument each peer's epoch (text in the JSON)")
    parser.add_argument("--only", choices=PEERS, action="append", help="run only this peer (repeatable)")
    parser.add_argument("--json-out")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)  # a subprocess of `run`
    parser.add_argument("--work", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.peer:
        result = _peer(a.peer, Path(a.work), a.threads or os.cpu_count(), a.profile)
        sys.stdout.flush()
        print(dumps(result))
        return
    result = run(a.tiny, a.pairs, a.threads, a.profile, tuple(a.only or PEERS))
    common.report_main("pudl.bench.train", result, argv, a.json_out, lines, plot)


if __name__ == "__main__":
    from pudl.hardware import ensure_fast_blas

    ensure_fast_blas()  # MLX's matmuls (pudl, mlx-lm-lora, the sgemm reading) need OpenBLAS; may re-execute
    main()
