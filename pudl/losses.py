"""Loss registry: algo name -> function(token_logps, batch, cfg) -> (loss, metrics).

A loss sees the policy's per-token log-probs of every sequence in the batch plus the batch's side data
(reference log-probs computed once and cached, scores, group layout). Adding an objective means adding a
function here; the training loop (`pudl.train`) never changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from pudl.kernels import dpo_loss
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
    losses = dpo_loss(chosen, rejected, cfg.beta, kind=cfg.loss)
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


LOSSES = {"dpo": dpo}
