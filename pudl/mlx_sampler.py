"""K candidates per prompt from the MLX student itself (mlx-lm model + KV cache), the `sample.backend = "mlx"` path.

Same interface and the same sampling rules as `pudl.sampler.Sampler`: the chat context is decoded once, its
KV cache is copied to K rows, and the K candidates advance together one token per step (rows that finish are
dropped from the batch). Tokens are drawn in NumPy by `pudl.sampler.draw` from candidate `idx`'s own RNG stream
(seeded by seed, round, prompt id, idx), and each token's log-prob is taken at temperature 1 before truncation,
so candidates, log-probs and resumes behave as with llama.cpp. The LoRA is the one the sampler was given:
`adapter_path=None` samples the base model (LoRA disabled), a GGUF LoRA or pudl MLX adapter file is loaded
into the student for the sampler's life; `close` puts the student's own LoRA state back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

from pudl.errors import UserError
from pudl.prompts import Prompt
from pudl.sampler import (_candidate, _chat_context, _end_of_generation_ids, _sample_all, _token_logprobs,
                          candidate_rng, draw)


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


class MLXSampler:
    """Sampling on the MLX student (`pudl.models.Student`) with mlx-lm's model and KV cache, one prompt at a time."""

    def __init__(self, student, tokenizer, adapter_path: Path | None = None, n_ctx: int = 1024):
        self.student, self.tokenizer, self.n_ctx = student, tokenizer, n_ctx
        layers = student.lora_layers.values()
        self._saved = (student.lora_state(), [layer.enabled for layer in layers])
        if adapter_path is None:
            student.set_adapter(False)
        else:
            student.load_lora_state(_adapter_state(adapter_path))
            student.set_adapter(True)
        self.eog = _end_of_generation_ids(tokenizer.llm.model, tokenizer)
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

    def sample(self, prompt: Prompt, k: int, temperature: float, max_tokens: int, seed: int, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0) -> list:
        """K candidates for one prompt (seeded by `seed`); the prompt is decoded once and shared by all of them."""
        from mlx_lm.models.cache import make_prompt_cache

        context = _chat_context(self.tokenizer, prompt, self.n_ctx)
        max_new = min(max_tokens, self.n_ctx - len(context))
        cache = make_prompt_cache(self.student.model)
        logits = self._logits(mx.array([context], mx.int32), cache)
        for c in cache:  # the prompt's keys/values, once per candidate (row r = candidate live[r])
            c.keys = mx.repeat(c.keys[:, :, : c.offset, :], k, axis=0)
            c.values = mx.repeat(c.values[:, :, : c.offset, :], k, axis=0)
        logits = np.repeat(logits, k, axis=0)
        rngs = [candidate_rng(seed, idx) for idx in range(k)]
        ids, logps = [[] for _ in range(k)], [[] for _ in range(k)]
        live, done = list(range(k)), {}
        while live:
            if temperature <= 0:
                tokens = logits.argmax(axis=1)
            else:
                tokens = np.array([draw(row, temperature, rngs[i], top_k, top_p, min_p)
                                   for row, i in zip(logits, live)])
            for i, token, logp in zip(live, tokens.tolist(), _token_logprobs(logits, tokens).tolist()):
                ids[i].append(token)
                logps[i].append(logp)
                if token in self.eog:
                    done[i] = "stop"
                elif len(ids[i]) >= max_new:
                    done[i] = "length"
            keep = [r for r, i in enumerate(live) if i not in done]
            if not keep:
                break
            if len(keep) < len(live):  # finished rows leave the batch
                rows = mx.array(keep)
                for c in cache:
                    c.keys, c.values = c.keys[rows], c.values[rows]
                tokens, live = tokens[keep], [live[r] for r in keep]
            logits = self._logits(mx.array(tokens[:, None].astype(np.int32)), cache)
        return [_candidate(self.tokenizer, prompt.id, i, ids[i], logps[i], done[i]) for i in range(k)]

    def generate(self, jobs: list[tuple[Prompt, int]], k: int, temperature: float, max_tokens: int, top_k: int,
                 top_p: float, min_p: float, on_prompt: Callable):
        """K candidates for each (prompt, seed), one prompt after another; `on_prompt` as each prompt ends."""
        for prompt, seed in jobs:
            on_prompt(prompt, self.sample(prompt, k, temperature, max_tokens, seed, top_k, top_p, min_p))

    def sample_all(self, prompts: list[Prompt], cfg, seed: int, round_: int, on_prompt: Callable):
        """Sample every prompt with the recipe's [sample] settings, handing each prompt's candidates to `on_prompt`."""
        _sample_all(self, prompts, cfg, seed, round_, on_prompt)
