"""What every sampler shares: the interface, per-candidate RNG streams, drawing a token, building a candidate.

Three backends implement `CandidateSampler`: `pudl.sampler.Sampler` (llama.cpp, batched, the default),
`pudl.sampler.SequentialSampler` (llama.cpp, one candidate at a time) and `pudl.mlx_sampler.MLXSampler` (the MLX
student itself). Each only has to `generate` K candidates for a list of (prompt, seed); everything that must
be identical across them (how a token is drawn from logits, which RNG stream draws it, how a reply ends and
becomes a `Candidate`) is here, so a resumed run samples the same candidates whichever backend and batching.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable

import numpy as np

from pudl.domain import Candidate, SamplingParams
from pudl.errors import UserError
from pudl.prompts import Prompt, chat_messages

OnPrompt = Callable[[Prompt, list[Candidate]], None]


class CandidateSampler(abc.ABC):
    """K candidates per prompt, each with its token ids and the policy's per-token log-probs.

    A sampler holds a model (and a LoRA) until `close`; use it as a context manager so an exception closes it."""

    @abc.abstractmethod
    def generate(self, jobs: list[tuple[Prompt, int]], params: SamplingParams, on_prompt: OnPrompt) -> None:
        """Sample params.k candidates for each (prompt, seed); call `on_prompt` as soon as a prompt's K are done."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free what the sampler holds (idempotent)."""

    def sample(self, prompt: Prompt, params: SamplingParams, seed: int) -> list[Candidate]:
        """K candidates for one prompt, seeded by `seed`."""
        out: list[Candidate] = []
        self.generate([(prompt, seed)], params, lambda p, cands: out.extend(cands))
        return out

    def sample_all(self, prompts: list[Prompt], params: SamplingParams, seed: int, round_: int,
                   on_prompt: OnPrompt) -> None:
        """Sample every prompt with the run's seed for this round (`prompt_seed`)."""
        self.generate([(p, prompt_seed(seed, round_, p.id)) for p in prompts], params, on_prompt)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def prompt_seed(seed: int, round_: int, prompt_id: str) -> int:
    """A per-prompt RNG seed that does not depend on the order prompts are visited in."""
    digest = hashlib.sha256(f"{seed}/{round_}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def candidate_rng(seed: int, idx: int) -> np.random.Generator:
    """Candidate `idx`'s own RNG stream under a prompt's seed (so batching never changes what it draws)."""
    return np.random.default_rng([seed, idx])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities along the last axis, in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_logprobs(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log_softmax(row)[token] for each row: `log_softmax` without its float64 copy of every row (float32
    exponentials, pairwise-summed in float32, agree to ~1e-6 over a 49k vocabulary and cost a third of it)."""
    m = logits.max(axis=1, keepdims=True)
    e = np.subtract(logits, m)
    np.exp(e, out=e)
    lse = np.log(e.sum(axis=1).astype(np.float64)) + m[:, 0]
    return logits[np.arange(len(tokens)), tokens] - lse


def draw(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token: greedy at temperature 0, else top-k, then top-p, then min-p (llama.cpp's order) at the
    temperature."""
    return int(draw_rows(logits[None], params, [rng])[0])


def draw_rows(logits: np.ndarray, params: SamplingParams, rngs) -> np.ndarray:
    """`draw` for every row of `logits` [n, V] at once, row i drawing one uniform from `rngs[i]`.

    Every step is row-wise, so a row's token does not depend on its batch mates: the batched and the
    sequential sampler (one row at a time) draw the same tokens from the same streams.
    """
    if params.temperature <= 0:
        return logits.argmax(axis=1)
    candidates = _top_candidates(logits, params.top_k)  # [n, c]: descending logit, ties to the lower token id
    probs = np.exp(log_softmax(np.take_along_axis(logits, candidates, axis=1) / params.temperature))
    keep = np.cumsum(probs, axis=1) - probs < params.top_p  # the smallest prefix whose mass reaches top_p
    keep &= probs >= params.min_p * probs[:, :1]
    keep[:, 0] = True  # the most likely token always stays
    # Inverse-CDF sampling over the kept tokens with one uniform per row (what Generator.choice does).
    cdf = np.cumsum(np.where(keep, probs, 0.0), axis=1)
    cdf /= cdf[:, -1:]
    u = np.array([rng.random() for rng in rngs])
    pick = np.minimum((cdf <= u[:, None]).sum(axis=1), candidates.shape[1] - 1)
    return candidates[np.arange(len(candidates)), pick]


def _top_candidates(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Each row's `top_k` token ids (all of them when 0), by descending logit, ties to the lower id."""
    n, v = logits.shape
    if not 0 < top_k < v:
        return np.argsort(-logits, axis=1, kind="stable")
    logits = np.ascontiguousarray(logits)
    # A cheap superset of the top k instead of a selection over all V: split each row into G strided groups;
    # the k groups with the largest maxima hold k values >= the k-th largest maximum t, so the top k are >= t.
    groups = max(top_k, min(512, v))
    t = np.partition(logits[:, : v // groups * groups].reshape(n, -1, groups).max(axis=1), groups - top_k,
                     axis=1)[:, groups - top_k]
    flat = np.flatnonzero(logits >= t[:, None])  # row-major: ascending ids within a row
    rows, ids = np.divmod(flat, v)
    order = np.lexsort((-logits.ravel()[flat], rows))  # by row, then descending logit; stable, so ties by id
    starts = np.searchsorted(rows, np.arange(n))
    return ids[order[starts[:, None] + np.arange(top_k)]]


def chat_context(tokenizer, prompt: Prompt, n_ctx: int) -> list[int]:
    """The prompt's chat-template tokens; a prompt that leaves no room for a reply in n_ctx is a UserError."""
    context = tokenizer.chat_tokens(chat_messages(prompt))
    if len(context) + 1 >= n_ctx:
        raise UserError(f"prompt {prompt.id!r}: {len(context)} tokens do not fit student.n_ctx={n_ctx}")
    return context


def make_candidate(tokenizer, prompt_id: str, idx: int, ids: list[int], logps: list[float], finish: str) -> Candidate:
    """A finished reply as a Candidate: the end-of-turn token is kept in its ids, not in its text."""
    text_ids = ids[:-1] if finish == "stop" else ids
    return Candidate(prompt_id, idx, tokenizer.decode(text_ids), np.array(ids, np.int32),
                     np.array(logps, np.float32), finish)


def end_of_generation_ids(model, tokenizer) -> set[int]:
    """Tokens that end a reply (llama.cpp model pointer): EOS plus every token llama.cpp classes as
    end-of-generation."""
    import llama_cpp

    ids = {tokenizer.eos_id}
    vocab = llama_cpp.llama_model_get_vocab(model)
    for t in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        if llama_cpp.llama_vocab_is_eog(vocab, t):
            ids.add(t)
    return ids
