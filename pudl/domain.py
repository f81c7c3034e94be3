"""The values one round passes from stage to stage: candidates, pairs, groups, sampling settings, the training job.

Plain data, no behaviour beyond construction: every layer may import this module, and it imports nothing of
pudl's but the recipe and prompt types. The cache stores these values; the wire format (`pudl.wire`) sends
them to the other training ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pudl.prompts import Prompt
from pudl.recipe import SampleConfig, TrainConfig

ANCHOR_IDX = -1  # the member index of the anchor (the labelled positive) in pairs, groups and scores
ANCHOR_BEHAVIOUR_IDX = -2  # a reference row: the anchor's log-probs under the policy that sampled the round


@dataclass(frozen=True)
class Candidate:
    """One sampled completion: its text, the sampler's token ids and per-token log-probs."""

    prompt_id: str
    idx: int
    text: str
    token_ids: np.ndarray  # int32 [n]
    logprobs: np.ndarray  # float32 [n]
    finish: str  # "stop" | "length"


@dataclass(frozen=True)
class Pair:
    """One DPO preference of a prompt: chosen over rejected (member indices; ANCHOR_IDX for the anchor)."""

    prompt_id: str
    kind: str  # "best-vs-worst" | "anchor-vs-worst"
    chosen_idx: int
    rejected_idx: int
    margin: float | None  # score gap; None when the chosen side is the anchor (it is not scored)


@dataclass(frozen=True)
class Group:
    """One prompt's ranked members (candidate indices, ANCHOR_IDX for the anchor) and their scores."""

    prompt_id: str
    members: tuple[int, ...]
    scores: tuple[float, ...]


@dataclass(frozen=True)
class SamplingParams:
    """How every sampler draws: K candidates per prompt, each up to max_tokens, with llama.cpp's truncations."""

    k: int = 1
    temperature: float = 0.0
    max_tokens: int = 32
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    @classmethod
    def of(cls, cfg: SampleConfig) -> SamplingParams:
        """The recipe's [sample] settings."""
        return cls(cfg.k, cfg.temperature, cfg.max_tokens, cfg.top_k, cfg.top_p, cfg.min_p)

    @classmethod
    def greedy(cls, max_tokens: int) -> SamplingParams:
        """One greedy reply per prompt (evaluation)."""
        return cls(1, 0.0, max_tokens)


@dataclass(frozen=True)
class TrainJob:
    """Everything a training stage trains on: what rank 0 sends the other ranks of a distributed run, who
    rebuild their slices of the same batches from it (`pudl.prefs.training_batches`)."""

    cfg: TrainConfig
    algo: str  # dpo | grpo | ldl | listmle | sft
    epochs: int | None  # None: cfg.epochs
    pairs: list[Pair]
    groups: list[Group]
    refs: dict  # (prompt id, member idx) -> reference token log-probs (float32)
    prompts: dict[str, Prompt]
    anchors: dict[str, str]
    candidates: dict[str, list[Candidate]]
    seed: int
    fingerprint: str
