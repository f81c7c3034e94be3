"""K candidates per prompt from the student GGUF through llama.cpp, with the current LoRA applied.

The prompt is decoded once; each candidate then reuses its KV cache (llama.cpp drops the stale tail when
we rewind `n_tokens`). Sampling is done here in NumPy from llama.cpp's logits, so every candidate keeps
its exact token ids and the policy's per-token log-probs (temperature 1, before top-p: the quantity the
MLX trainer computes for the same tokens), and the draw is seeded per (seed, round, prompt) so a resumed
run samples the same candidates.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pudl.cache import Candidate
from pudl.errors import UserError
from pudl.llamacpp import open_llama
from pudl.prompts import Prompt, chat_messages


def prompt_seed(seed: int, round_: int, prompt_id: str) -> int:
    """A per-prompt RNG seed that does not depend on the order prompts are visited in."""
    digest = hashlib.sha256(f"{seed}/{round_}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def draw(logits: np.ndarray, temperature: float, rng: np.random.Generator, top_k: int = 0, top_p: float = 1.0,
         min_p: float = 0.0) -> int:
    """One token: greedy at temperature 0, else top-k, then top-p, then min-p (llama.cpp's order) at `temperature`."""
    if temperature <= 0:
        return int(np.argmax(logits))
    if 0 < top_k < len(logits):
        candidates = np.argpartition(-logits, top_k - 1)[:top_k]
    else:
        candidates = np.arange(len(logits))
    candidates = candidates[np.argsort(-logits[candidates], kind="stable")]
    probs = np.exp(log_softmax(logits[candidates] / temperature))
    keep = np.cumsum(probs) - probs < top_p  # the smallest prefix whose mass reaches top_p
    keep &= probs >= min_p * probs[0]
    kept = candidates[keep]
    p = probs[keep] / probs[keep].sum()
    return int(kept[rng.choice(len(kept), p=p)])


class Sampler:
    """llama.cpp on the student GGUF (+ optional GGUF LoRA): candidates with token ids and log-probs."""

    def __init__(self, gguf_path: Path, tokenizer, adapter_path: Path | None = None, n_ctx: int = 1024,
                 threads: int = 0):
        kwargs = {"lora_path": str(adapter_path)} if adapter_path is not None else {}
        self.llm = open_llama(gguf_path, n_ctx=n_ctx, n_threads=threads or os.cpu_count(),
                              n_batch=min(512, n_ctx), **kwargs)
        self.n_vocab = self.llm.n_vocab()
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.eog = _end_of_generation_ids(self.llm, tokenizer)

    def close(self):
        self.llm.close()

    def _last_logits(self) -> np.ndarray:
        """Logits after the last decoded token (llama.cpp keeps only those unless logits_all)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,)).copy()

    def sample(self, prompt: Prompt, k: int, temperature: float, max_tokens: int, seed: int, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0) -> list[Candidate]:
        """K candidates for one prompt; the first decode of the prompt is shared by all of them."""
        context = self.tokenizer.chat_tokens(chat_messages(prompt))
        if len(context) + 1 >= self.n_ctx:
            raise UserError(f"prompt {prompt.id!r}: {len(context)} tokens do not fit student.n_ctx={self.n_ctx}")
        max_tokens = min(max_tokens, self.n_ctx - len(context))
        rng = np.random.default_rng(seed)
        llm = self.llm
        llm.reset()
        llm.eval(context)
        n_prompt, prompt_logits = llm.n_tokens, self._last_logits()
        out = []
        for idx in range(k):
            llm.n_tokens = n_prompt  # rewind: the next eval overwrites the previous candidate's KV
            ids, logps, finish = [], [], "length"
            logits = prompt_logits
            for step in range(max_tokens):
                if step:
                    logits = self._last_logits()
                token = draw(logits, temperature, rng, top_k, top_p, min_p)
                ids.append(token)
                logps.append(float(log_softmax(logits)[token]))
                if token in self.eog:
                    finish = "stop"
                    break
                llm.eval([token])
            text_ids = ids[:-1] if finish == "stop" else ids
            out.append(Candidate(prompt.id, idx, self.tokenizer.decode(text_ids),
                                 np.array(ids, np.int32), np.array(logps, np.float32), finish))
        return out

    def sample_all(self, prompts: list[Prompt], cfg, seed: int, round_: int,
                   on_prompt: Callable[[Prompt, list[Candidate]], None]):
        """Sample every prompt with the recipe's [sample] settings, handing each prompt's candidates to `on_prompt`."""
        for prompt in prompts:
            on_prompt(prompt, self.sample(prompt, cfg.k, cfg.temperature, cfg.max_tokens,
                                          prompt_seed(seed, round_, prompt.id), cfg.top_k, cfg.top_p, cfg.min_p))


def _end_of_generation_ids(llm, tokenizer) -> set[int]:
    """Tokens that end a reply: EOS plus every token llama.cpp classes as end-of-generation."""
    import llama_cpp

    ids = {tokenizer.eos_id}
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    for t in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        if llama_cpp.llama_vocab_is_eog(vocab, t):
            ids.add(t)
    return ids
