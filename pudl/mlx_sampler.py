"""K candidates per prompt from the MLX student itself (mlx-lm model + KV cache), the `sample.backend = "mlx"` path.

The same interface (`pudl.sampling.CandidateSampler`) and sampling rules as `pudl.sampler.Sampler`: a batch of prompts is decoded once
(left-padded, mlx-lm's BatchKVCache), each prompt's cache row is copied to K rows, and all candidates advance
together one token per step (rows that finish leave the batch). Tokens are drawn in NumPy by
`pudl.sampling.draw` from candidate `idx`'s own RNG stream (seeded by seed, round, prompt id, idx), and each
token's log-prob is taken at temperature 1 before truncation, so candidates, log-probs and resumes behave as
with llama.cpp. The LoRA is the one the sampler was given:
`adapter_path=None` samples the base model (LoRA disabled), a GGUF LoRA or pudl MLX adapter file is loaded
into the student for the sampler's life; `close` puts the student's own LoRA state back.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from pudl.domain import SamplingParams
from pudl.errors import UserError
from pudl.prompts import Prompt
from pudl.sampling import (CandidateSampler, OnPrompt, candidate_rng, chat_context, draw, end_of_generation_ids,
                           make_candidate, token_logprobs)


def _adapter_state(path: Path) -> dict:
    """LoRA tensors (Student.lora_state layout) of a GGUF LoRA or a pudl MLX adapter (safetensors)."""
    from pudl.adapters import read_gguf_lora

    path = Path(path)
    if path.suffix == ".gguf":
        return read_gguf_lora(path).state
    try:
        return mx.load(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a pudl adapter ({e})") from None


class MLXSampler(CandidateSampler):
    """Sampling on the MLX student (`pudl.models.Student`) with mlx-lm's model and batched KV cache: about
    `rows` sequences (rows // K prompts x K candidates) advance per decode step."""

    def __init__(self, student, tokenizer, adapter_path: Path | None = None, n_ctx: int = 1024, rows: int = 32):
        self.student, self.tokenizer, self.n_ctx, self.rows = student, tokenizer, n_ctx, rows
        layers = student.lora_layers.values()
        self._saved = (student.lora_state(), [layer.enabled for layer in layers])
        if adapter_path is None:
            student.set_adapter(False)
        else:
            student.load_lora_state(_adapter_state(adapter_path))
            student.set_adapter(True)
        self.eog = end_of_generation_ids(tokenizer.llm.model, tokenizer)
        model = student.model
        self._head = model.model.embed_tokens.as_linear if student.args.tie_word_embeddings else model.lm_head

    def close(self):
        """Give the student back its own LoRA state and enabled flags (idempotent)."""
        if self._saved is None:
            return
        state, enabled = self._saved
        self.student.load_lora_state(state)
        for layer, on in zip(self.student.lora_layers.values(), enabled):
            layer.enabled = on
        self._saved = None

    def _logits(self, tokens: mx.array, cache) -> np.ndarray:
        """Float32 logits [B, V] after the last token of each row of `tokens` [B, T]."""
        hidden = self.student.model.model(tokens, cache=cache)[:, -1:, :]
        return np.array(self._head(hidden)[:, 0, :].astype(mx.float32))

    def generate(self, jobs: list[tuple[Prompt, int]], params: SamplingParams, on_prompt: OnPrompt):
        """K candidates for each (prompt, seed), rows // K prompts per batch; `on_prompt` as each prompt ends."""
        per_batch = max(1, self.rows // params.k)
        for start in range(0, len(jobs), per_batch):
            self._batch(jobs[start : start + per_batch], params, on_prompt)

    def _batch(self, jobs: list[tuple[Prompt, int]], params: SamplingParams, on_prompt: OnPrompt):
        """One batch of prompts: a left-padded prefill (mlx-lm's BatchKVCache), each prompt's row copied to K
        rows, then one token per step for every live row; finished rows leave the batch."""
        from pudl.mlx_lm_models import cache as kv_cache

        k = params.k
        contexts = [chat_context(self.tokenizer, prompt, self.n_ctx) for prompt, _ in jobs]
        width = max(map(len, contexts))
        pads = [width - len(c) for c in contexts]
        cache = [kv_cache.BatchKVCache(pads) for _ in self.student.model.model.layers]
        logits = self._logits(mx.array([[0] * pad + c for pad, c in zip(pads, contexts)], mx.int32), cache)
        live = [(j, idx) for j in range(len(jobs)) for idx in range(k)]  # one row per (prompt, candidate)
        rows = [j for j, _ in live]
        for c in cache:
            c.filter(mx.array(rows))
        logits = logits[rows]
        rngs = {(j, idx): candidate_rng(jobs[j][1], idx) for j, idx in live}
        max_new = [min(params.max_tokens, self.n_ctx - len(c)) for c in contexts]
        ids, logps, done = {key: [] for key in live}, {key: [] for key in live}, {}
        finished = [0] * len(jobs)
        while live:
            if params.temperature <= 0:
                step = logits.argmax(axis=1)
            else:
                step = np.array([draw(row, params, rngs[key]) for row, key in zip(logits, live)])
            for key, token, logp in zip(live, step.tolist(), token_logprobs(logits, step).tolist()):
                ids[key].append(token)
                logps[key].append(logp)
                j = key[0]
                finish = "stop" if token in self.eog else "length" if len(ids[key]) >= max_new[j] else None
                if finish is None:
                    continue
                done[key] = finish
                finished[j] += 1
                if finished[j] == k:  # the whole prompt is done: hand it over now
                    prompt = jobs[j][0]
                    on_prompt(prompt, [make_candidate(self.tokenizer, prompt.id, i, ids[(j, i)], logps[(j, i)],
                                                  done[(j, i)]) for i in range(k)])
            keep = [r for r, key in enumerate(live) if key not in done]
            if not keep:
                break
            if len(keep) < len(live):  # finished rows leave the batch
                for c in cache:
                    c.filter(mx.array(keep))
                step, live = step[keep], [live[r] for r in keep]
            logits = self._logits(mx.array(step[:, None].astype(np.int32)), cache)
