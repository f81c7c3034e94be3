"""THE training loop: one loop for every objective; the loss and the batches are passed in.

The checkpoint is a plain pair of files (LoRA + optimizer tensors as safetensors, step + fingerprint as
JSON), written atomically (temp file + rename) every `checkpoint_every` steps and at the end, so a killed
run resumes at the last checkpoint with its optimizer state and step. The only randomness of training is
the batch order, a pure function of (seed, round) laid out before the loop, so resuming at step s replays
exactly the batches a run without the interruption would have seen; the learning rate is constant.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from pudl.atomic_files import atomic_save
from pudl.distributed import SINGLE, World
from pudl.errors import UserError
from pudl.losses import TrainBatch
from pudl.sequences import SeqBatch, batch_token_logprobs


@dataclass(frozen=True)
class TrainResult:
    steps: int
    resumed_from: int
    tokens: int
    seconds: float


def save_checkpoint(directory: Path, student, optimizer, step: int, fingerprint: str):
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"lora." + k: v for k, v in student.lora_state().items()}
    tensors.update({"opt." + k: v for k, v in tree_flatten(optimizer.state)})
    atomic_save(directory / "checkpoint.safetensors", lambda p: mx.save_safetensors(p, tensors))
    state = {"step": step, "fingerprint": fingerprint}
    atomic_save(directory / "checkpoint.json", lambda p: Path(p).write_text(json.dumps(state)))


def load_checkpoint(directory: Path, student, optimizer, fingerprint: str) -> int:
    """Restore the latest checkpoint of this training (same fingerprint); return its step (0 if none)."""
    meta_path, tensor_path = directory / "checkpoint.json", directory / "checkpoint.safetensors"
    if not meta_path.exists() or not tensor_path.exists():
        return 0
    state = json.loads(meta_path.read_text())
    if state.get("fingerprint") != fingerprint:
        return 0
    tensors = mx.load(str(tensor_path))
    student.load_lora_state({k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
    opt_items = [(k[4:], v) for k, v in tensors.items() if k.startswith("opt.")]
    if opt_items:
        optimizer.state = tree_unflatten(opt_items)
    return int(state["step"])


def train(student, batches: Sequence[TrainBatch], loss_fn, cfg, *, checkpoint_dir: Path, fingerprint: str,
          checkpoint_every: int = 50, on_step: Callable[[int, dict], None] | None = None,
          world: World = SINGLE) -> TrainResult:
    """Run the optimizer over `batches` in order (epochs already laid out by the caller) with `loss_fn`.

    In a distributed run (`world.size` > 1) `batches` are this rank's slices of the global batches: rank 0's
    state is shared first, every step's loss, metrics and gradients are averaged over the ranks before the
    finite check and the update (so every rank decides and updates alike), and only rank 0 checkpoints."""
    model = student.model
    optimizer = optim.AdamW(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
    optimizer.init(model.trainable_parameters())
    if world.size > 1:  # a checkpoint's steps count global batches of this many ranks: resume only with as many
        fingerprint = f"{fingerprint}/{world.size}-ranks"
    start = load_checkpoint(checkpoint_dir, student, optimizer, fingerprint) if world.is_main else 0
    start = world.sync_training_state(student, optimizer, start)

    def objective(_model, batch):
        return loss_fn(batch_token_logprobs(student, batch.seqs, grad_ready=True, recompute=cfg.recompute),
                       batch, cfg)

    value_and_grad = nn.value_and_grad(model, objective)

    def gradients(arrays, extras):
        (loss, metrics), grads = value_and_grad(model, TrainBatch(SeqBatch(*arrays), extras))
        grad_sq = sum((g * g).sum() for _, g in tree_flatten(grads))
        return loss, metrics, grads, grad_sq

    # The forward/backward is compiled (traced once per padded batch shape: ~2x faster on CPU); the update
    # stays outside so a non-finite step can be refused before it touches the weights.
    gradients = mx.compile(gradients, inputs=model.state, outputs=model.state)  # value_and_grad re-sets params
    tokens, t0, saved = 0, time.perf_counter(), start
    for step in range(start, len(batches)):
        batch = batches[step]
        t_step = time.perf_counter()
        loss, metrics, grads, grad_sq = gradients(batch.seqs.arrays, batch.extras)
        n_tok = batch.seqs.n_tokens
        if world.size > 1:  # the weighted mean over the global batch, identical on every rank
            loss, metrics, grads = world.weighted_mean((loss, metrics, grads), batch.n_items)
            grad_sq = sum((g * g).sum() for _, g in tree_flatten(grads))
            n_tok = int(world.all_sum(mx.array(n_tok)).item())
        mx.eval(loss, metrics, grads, grad_sq)
        loss_value = float(loss)
        if not (math.isfinite(loss_value) and math.isfinite(float(grad_sq))):
            what = f"loss is {loss_value}" if not math.isfinite(loss_value) else "the gradient is not finite"
            kept = f"the checkpoint of step {saved} is kept in {checkpoint_dir}" if saved else "no checkpoint yet"
            raise UserError(f"training diverged: {what} at step {step + 1}; that step was not applied and "
                            f"{kept} (lower train.learning_rate?)")
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state)
        tokens += n_tok
        if on_step:
            row = {"step": step + 1, "loss": loss_value, **{k: float(v) for k, v in metrics.items()},
                   "tokens_per_s": n_tok / max(time.perf_counter() - t_step, 1e-9),
                   "peak_memory_bytes": int(mx.get_peak_memory())}
            on_step(step + 1, row)
        if world.is_main and ((step + 1) % checkpoint_every == 0 or step + 1 == len(batches)):
            save_checkpoint(checkpoint_dir, student, optimizer, step + 1, fingerprint)
            saved = step + 1
    return TrainResult(len(batches), start, tokens, time.perf_counter() - t0)
