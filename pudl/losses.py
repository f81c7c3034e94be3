"""Loss registry: algo name -> function(token_logps, batch, cfg) -> (loss, metrics).

A loss sees the policy's per-token log-probs of every sequence in the batch plus the batch's side data
(reference log-probs computed once and cached, scores, group layout). Adding an objective means adding a
function here; the training loop (`pudl.train`) never changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from pudl.kernels import dpo_loss, grpo_token_loss, ldl_loss, listmle_loss
from pudl.sequences import SeqBatch


@dataclass(frozen=True)
class TrainBatch:
    """Sequences to run through the policy plus what the loss needs about them."""

    seqs: SeqBatch
    extras: dict = field(default_factory=dict)  # name -> mx.array, per sequence or per group
    n_items: int = 0  # pairs or groups in this batch


def dpo(token_logps: mx.array, batch: TrainBatch, cfg) -> tuple[mx.array, dict]:
    """DPO over pairs laid out [chosen0, rejected0, chosen1, ...]; reference log-probs are cached extras."""
    seq = token_logps.sum(axis=1)
    ratio = seq - batch.extras["ref_logps"]
    chosen, rejected = ratio[0::2], ratio[1::2]
    losses = dpo_loss(chosen, rejected, cfg.beta, kind=cfg.loss, label_smoothing=cfg.label_smoothing)
    reward_c, reward_r = cfg.beta * chosen, cfg.beta * rejected
    metrics = {
        "rewards/chosen": reward_c.mean(),
        "rewards/rejected": reward_r.mean(),
        "rewards/margins": (reward_c - reward_r).mean(),
        "rewards/accuracies": (reward_c > reward_r).astype(mx.float32).mean(),
        "logps/chosen": seq[0::2].mean(),
        "logps/rejected": seq[1::2].mean(),
    }
    return losses.mean(), metrics


def _group_logratios(token_logps: mx.array, batch: TrainBatch) -> mx.array:
    """Sequence log-ratios (policy - reference) placed on the [G, K] group grid (0 at padding slots)."""
    ratio = token_logps.sum(axis=1) - batch.extras["ref_logps"]
    padded = mx.concatenate([ratio, mx.zeros((1,), ratio.dtype)])
    return padded[batch.extras["slots"]] * batch.extras["group_mask"]


def _group_metrics(logratio: mx.array, batch: TrainBatch, cfg) -> dict:
    """How the policy's preference over each group lines up with the self-ranking (TRL-style names)."""
    mask, scores = batch.extras["group_mask"], batch.extras["scores"]
    best = mx.argmax(mx.where(mask > 0, scores, -mx.inf), axis=1)
    worst = mx.argmin(mx.where(mask > 0, scores, mx.inf), axis=1)
    r_best = cfg.beta * mx.take_along_axis(logratio, best[:, None], axis=1)[:, 0]
    r_worst = cfg.beta * mx.take_along_axis(logratio, worst[:, None], axis=1)[:, 0]
    return {"rewards/chosen": r_best.mean(), "rewards/rejected": r_worst.mean(),
            "rewards/margins": (r_best - r_worst).mean(),
            "rewards/accuracies": (r_best > r_worst).astype(mx.float32).mean(),
            "completions/mean_length": batch.seqs.mask.sum(axis=1).mean()}


def ldl(token_logps: mx.array, batch: TrainBatch, cfg) -> tuple[mx.array, dict]:
    """Label-distribution learning: KL(softmax(scores/tau) || softmax(beta * log-ratio)) per group."""
    logratio = _group_logratios(token_logps, batch)
    loss = ldl_loss(logratio, batch.extras["scores"], batch.extras["group_mask"], cfg.beta, cfg.tau).mean()
    return loss, _group_metrics(logratio, batch, cfg)


def listmle(token_logps: mx.array, batch: TrainBatch, cfg) -> tuple[mx.array, dict]:
    """Plackett-Luce NLL of the self-ranked order under beta * log-ratio."""
    logratio = _group_logratios(token_logps, batch)
    loss = listmle_loss(logratio, batch.extras["scores"], batch.extras["group_mask"], cfg.beta).mean()
    return loss, _group_metrics(logratio, batch, cfg)


def grpo(token_logps: mx.array, batch: TrainBatch, cfg) -> tuple[mx.array, dict]:
    """Clipped importance-ratio surrogate on group-relative advantages + beta * k3 KL to the reference."""
    e = batch.extras
    mask = batch.seqs.mask
    loss = grpo_token_loss(token_logps, e["old_tokens"], e["ref_tokens"], e["advantages"], mask,
                           cfg.clip_eps, cfg.beta, cfg.norm)
    diff = e["ref_tokens"] - token_logps
    kl = ((mx.exp(diff) - diff - 1) * mask).sum() / mx.maximum(mask.sum(), 1)
    metrics = _group_metrics(_group_logratios(token_logps, batch), batch, cfg)
    metrics["kl"] = kl
    return loss, metrics


def sft(token_logps: mx.array, batch: TrainBatch, cfg) -> tuple[mx.array, dict]:
    """Supervised fine-tuning on the anchors: mean NLL over every anchor token of the batch (token-weighted,
    so a long anchor counts by its length, as in standard SFT)."""
    mask = batch.seqs.mask
    nll = -token_logps.sum() / mx.maximum(mask.sum(), 1)
    return nll, {"nll/anchor": nll, "completions/mean_length": mask.sum(axis=1).mean()}


def with_anchor_nll(loss_fn):
    """Add `anchor_nll` x the mean per-token NLL of the anchor sequences in the batch (if any)."""

    def wrapped(token_logps: mx.array, batch: TrainBatch, cfg) -> tuple[mx.array, dict]:
        loss, metrics = loss_fn(token_logps, batch, cfg)
        is_anchor = batch.extras.get("is_anchor")
        if cfg.anchor_nll > 0 and is_anchor is not None:
            lengths = mx.maximum(batch.seqs.mask.sum(axis=1), 1)
            nll = -(token_logps.sum(axis=1) / lengths * is_anchor).sum() / mx.maximum(is_anchor.sum(), 1)
            loss = loss + cfg.anchor_nll * nll
            metrics = {**metrics, "nll/anchor": nll}
        return loss, metrics

    wrapped.__doc__ = loss_fn.__doc__
    return wrapped


LOSSES = {name: with_anchor_nll(fn) for name, fn in {"dpo": dpo, "grpo": grpo, "ldl": ldl, "listmle": listmle}.items()}
LOSSES["sft"] = sft  # already the anchor NLL: no extra term
