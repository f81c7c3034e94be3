"""K candidates per prompt from the student GGUF through llama.cpp, with the current LoRA applied.

`Sampler` (batched, the default) drives llama.cpp's low-level API: each prompt is decoded once into one
sequence and shared by its K sequences (`llama_memory_seq_cp`), and every live sequence of several prompts
advances by one token in one `llama_decode` per step; new prompts join as soon as K sequence slots (and, in a
unified cache, KV cells) are free. The KV cache is one unified cell pool for small jobs (a prompt's cells
shared, but every token attends over all the cells in flight) and a stream per sequence for large ones (a
token attends over its own sequence only; the prompt's cells copied). `SequentialSampler` is the simple
one-candidate-at-a-time fallback on the high-level `Llama` object.

Both implement `pudl.sampling.CandidateSampler` and sample in NumPy from llama.cpp's logits with its shared
pieces, so every candidate keeps its exact token ids and the policy's per-token log-probs (temperature 1,
before truncation: the quantity the MLX trainer computes for the same tokens). Candidate `idx` of a prompt
draws from its own RNG stream, seeded by (seed, round, prompt id, idx): a resumed run samples the same
candidates, and both samplers agree whatever the batching.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pudl.domain import Candidate, SamplingParams
from pudl.errors import UserError
from pudl.llamacpp import _without_extra_buffers, open_llama, quiet_stderr
from pudl.prompts import Prompt
from pudl.recipe import KV_CACHES
from pudl.sampling import (CandidateSampler, OnPrompt, candidate_rng, chat_context, draw, draw_rows,
                           end_of_generation_ids, log_softmax, make_candidate, token_logprobs)

DEFAULT_SEQUENCES = 64  # live sequences per decode step (batched throughput still grows at 64 on 2 cores)


class _Batch:
    """A `llama_batch` over NumPy buffers, so filling it is slice assignment rather than a ctypes call per token."""

    def __init__(self, capacity: int):
        import llama_cpp

        self.capacity = capacity
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.seq = np.zeros(capacity, np.int32)
        self.logits = np.zeros(capacity, np.int8)
        self.n_seq_id = np.ones(capacity, np.int32)  # a token belongs to one sequence
        ptr = ctypes.POINTER(llama_cpp.llama_seq_id)
        self._seq_ptrs = (ptr * capacity)(*(ctypes.cast(self.seq.ctypes.data + 4 * i, ptr) for i in range(capacity)))
        self.n = 0

        def p(a, ctype):
            return a.ctypes.data_as(ctypes.POINTER(ctype))

        # The buffers never move, so one struct serves every decode: only its token count changes.
        self._struct = llama_cpp.llama_batch(0, p(self.token, ctypes.c_int32), None, p(self.pos, ctypes.c_int32),
                                             p(self.n_seq_id, ctypes.c_int32), self._seq_ptrs,
                                             p(self.logits, ctypes.c_int8))

    def clear(self):
        self.n = 0

    def add(self, tokens, pos0: int, seq_id: int, logits_last: bool):
        n = len(tokens)
        s = slice(self.n, self.n + n)
        self.token[s], self.pos[s], self.seq[s], self.logits[s] = tokens, np.arange(pos0, pos0 + n), seq_id, 0
        self.logits[self.n + n - 1] = logits_last
        self.n += n

    def struct(self):
        self._struct.n_tokens = self.n
        return self._struct


@dataclass
class _Group:
    """One prompt in flight: its context, reply budget, reserved KV cells (unified cache) and finished candidates."""

    prompt: Prompt
    seed: int
    context: list[int]
    max_new: int
    cells: int
    done: list = field(default_factory=list)


@dataclass
class _Seq:
    """One candidate in flight, in sequence slot `slot` (the live ones always fill slots 0..n-1)."""

    group: _Group
    idx: int
    slot: int
    rng: np.random.Generator
    ids: list = field(default_factory=list)
    logps: list = field(default_factory=list)


# kv_cache = "auto": a stream per sequence once a unified cache would need more than STREAMS_ABOVE_CELLS cells,
# if the streams (llama.cpp rounds each up to STREAM_PAD cells) need at most STREAMS_MEMORY_RATIO x as many cells
# (long replies, not long shared prompts) and fit STREAMS_RAM_SHARE of the RAM.
STREAMS_ABOVE_CELLS = 2048
STREAM_PAD = 256
STREAMS_MEMORY_RATIO = 2.0
STREAMS_RAM_SHARE = 1 / 16


FLOAT_COPY_SHARE = 0.125  # the largest share of RAM a float32 copy of the student may take for sampling


def float_copy_fits(n_params: int, ram_bytes: int | None = None) -> bool:
    """Whether a float32 copy of `n_params` weights fits in FLOAT_COPY_SHARE of the RAM (total physical
    memory by default): the MLX student already holds one float32 copy on the CPU, and a 3B model's second
    one (12 GB) would not fit a 16 GB laptop, so larger students are sampled from their quantized weights."""
    return 4 * n_params <= FLOAT_COPY_SHARE * (_ram_bytes() if ram_bytes is None else ram_bytes)


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _kv_bytes_per_cell(model) -> int:
    """Float32 K and V of one cell over all layers (head size taken as n_embd / n_head)."""
    import llama_cpp

    head_dim = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
    return 2 * 4 * llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model) * head_dim


def _load_model(path: Path, float_weights: bool | None, threads: int):
    """The llama.cpp model of a GGUF; quantized weights are first dequantized to float32 when `float_weights`
    (None: when llama.cpp computes on the CPU, where its batched float kernels beat its quantized ones, and
    the float32 copy is small: `float_copy_fits`)."""
    import llama_cpp

    def load(p: str):
        # llama_cpp.llama_cpp's default params are the ones pudl.llamacpp patches (AMX repacking segfaults here).
        with _without_extra_buffers(), quiet_stderr():
            params = llama_cpp.llama_cpp.llama_model_default_params()
            return llama_cpp.llama_model_load_from_file(p.encode(), params)

    model = load(str(path))
    if not model:
        raise UserError(f"student.model: llama.cpp cannot load {path}")
    if float_weights is None:
        float_weights = not llama_cpp.llama_supports_gpu_offload() and \
            float_copy_fits(llama_cpp.llama_model_n_params(model))
    if not float_weights or llama_cpp.llama_model_size(model) >= 2 * llama_cpp.llama_model_n_params(model):
        return model  # already float (or asked to keep the quantized blocks)
    llama_cpp.llama_model_free(model)
    # Dequantize into memory (a memfd), not next to the user's files: ~1 s for 135M parameters.
    memfd = os.memfd_create("pudl-f32.gguf") if hasattr(os, "memfd_create") else None
    if memfd is not None:
        target = f"/proc/self/fd/{memfd}"
    else:
        fd, target = tempfile.mkstemp(suffix=".gguf")
        os.close(fd)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.pure = llama_cpp.LLAMA_FTYPE_ALL_F32, True, True
        params.nthread = threads
        with quiet_stderr():
            rc = llama_cpp.llama_model_quantize(str(path).encode(), target.encode(), ctypes.byref(params))
        model = load(target) if rc == 0 else None
    finally:  # the loaded model maps the file, so it outlives these names
        if memfd is not None:
            os.close(memfd)
        else:
            os.unlink(target)
    if not model:
        raise UserError(f"student.model: llama.cpp cannot dequantize {path}")
    return model


class Sampler(CandidateSampler):
    """Batched llama.cpp sampling on the student GGUF (+ optional GGUF LoRA): K candidates per prompt, many prompts at once.

    `n_ctx` bounds one sequence (prompt + reply), as for `SequentialSampler`. Each `generate` runs up to
    `sequences` sequences at once (K per prompt in flight), plus one for the prompts' shared head (the chat
    template's system prompt...), decoded once. `kv_cache`: "unified" (one cell pool sized for the prompts in
    flight, each reserving its prompt + K x max_tokens cells), "streams" (a stream per sequence of prompt +
    max_tokens cells, at least 256), or "auto": streams for jobs with many long replies in flight (see
    STREAMS_ABOVE_CELLS: llama.cpp costs more per sequence with streams, the unified cache more per cell in
    flight: docs/benchmarks.md). On the CPU, a quantized GGUF is dequantized to float32 first (`float_weights`;
    only when `float_copy_fits`): the same weights, ~1.8x the batched speed of llama.cpp's Q4_1 kernels here
    (bench/sampling_steps.py), and log-probs equal to the MLX student's float32 ones instead of ~0.5 off
    (llama.cpp quantizes activations to 8 bits for its quantized kernels).
    """

    def __init__(self, gguf_path: Path, tokenizer, adapter_path: Path | None = None, n_ctx: int = 1024,
                 threads: int = 0, sequences: int = DEFAULT_SEQUENCES, float_weights: bool | None = None,
                 kv_cache: str = "auto"):
        import llama_cpp

        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}")
        llama_cpp.llama_backend_init()
        self.tokenizer, self.n_ctx, self.sequences, self.kv_cache = tokenizer, n_ctx, sequences, kv_cache
        self.threads = threads or os.cpu_count()
        self.ctx = self.adapter = None
        self.n_seq = self.kv_cells = 0
        self.streams = False
        self.on_decode: Callable[[int, int, float], None] | None = None  # the benches time each decode with it
        self.model = _load_model(gguf_path, float_weights, self.threads)
        if adapter_path is not None:
            with quiet_stderr():
                self.adapter = llama_cpp.llama_adapter_lora_init(self.model, str(adapter_path).encode())
            if not self.adapter:
                self.close()
                raise UserError(f"llama.cpp cannot load the LoRA adapter {adapter_path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.eog = end_of_generation_ids(self.model, tokenizer)

    def prepare(self, n_seq: int, streams: bool, kv_cells: int, n_batch: int):
        """Low level (`generate` and the benches): a context of at least `n_seq` sequences and `n_batch` tokens a batch, with `kv_cells` cells in one
        unified pool or, with `streams`, in each sequence's own stream (the previous context when it fits)."""
        import llama_cpp

        if not streams:
            kv_cells = max(kv_cells, n_batch)  # llama.cpp caps a batch at the cache size
        if self.ctx and streams == self.streams and n_seq <= self.n_seq and kv_cells <= self.kv_cells \
                and n_batch <= self.batch.capacity:
            llama_cpp.llama_memory_clear(self.memory, False)
            return
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_seq * kv_cells if streams else kv_cells
        params.n_batch = n_batch
        params.n_ubatch = min(512, params.n_batch)
        params.n_seq_max = n_seq
        params.kv_unified = not streams
        # Exact attention: llama.cpp's CPU flash attention and a float16 cache both round through float16
        # (log-probs off by 0.01-0.02); this way they match the MLX student's to ~1e-5 on float weights.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
        params.n_threads = params.n_threads_batch = self.threads
        with quiet_stderr():
            self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise UserError(f"llama.cpp could not create a KV cache of {params.n_ctx} cells for {n_seq} sequences "
                            "(lower sample.sequences, or sample.backend = \"llamacpp-sequential\": one sequence)")
        if self.adapter:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapter)
            if llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)):
                raise UserError("llama.cpp cannot apply the LoRA adapter")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_seq, self.streams, self.kv_cells = n_seq, streams, n_ctx // n_seq if streams else n_ctx
        self.batch = _Batch(llama_cpp.llama_n_batch(self.ctx))

    def close(self):
        """Free the context, adapter and model (idempotent)."""
        import llama_cpp

        if self.ctx:
            llama_cpp.llama_free(self.ctx)
        if self.adapter:
            llama_cpp.llama_adapter_lora_free(self.adapter)
        if self.model:
            llama_cpp.llama_model_free(self.model)
        self.model = self.ctx = self.adapter = None

    def generate(self, jobs: list[tuple[Prompt, int]], params: SamplingParams, on_prompt: OnPrompt):
        """Sample K candidates for each (prompt, seed), many prompts per decode; `on_prompt` as each prompt ends."""
        import llama_cpp

        if not jobs:
            return
        k, max_tokens = params.k, params.max_tokens
        contexts = [chat_context(self.tokenizer, prompt, self.n_ctx) for prompt, _ in jobs]
        max_slots = llama_cpp.llama_max_parallel_sequences() - 1  # one more sequence holds the shared head
        if k > max_slots:
            raise UserError(f"sample.k={k} exceeds llama.cpp's {max_slots} parallel sequences "
                            "(sample.backend = \"llamacpp-sequential\" samples any K, one at a time)")
        slots = min(max(self.sequences, k), len(jobs) * k, max_slots)
        prefix = os.path.commonprefix(contexts)[: min(map(len, contexts)) - 1] if len(jobs) > 1 else []
        groups = deque()
        for (prompt, seed), context in zip(jobs, contexts):
            max_new = min(max_tokens, self.n_ctx - len(context))
            groups.append(_Group(prompt, seed, context, max_new, len(context) - len(prefix) + k * max_new))
        unified_cells = len(prefix) + slots // k * max(g.cells for g in groups)
        stream_cells = max(len(g.context) + g.max_new for g in groups)
        streams = self.kv_cache == "streams" or self.kv_cache == "auto" and self._streams_pay(unified_cells,
                                                                                              slots, stream_cells)
        self.prepare(slots + 1, streams, stream_cells if streams else unified_cells,
                      max(512, max(map(len, contexts)) - len(prefix) + slots))
        batch, head = self.batch, self.n_seq - 1  # the shared head's sequence id: after every slot
        free_cells = float("inf") if streams else self.kv_cells - len(prefix)
        if prefix:
            batch.clear()
            batch.add(prefix, 0, head, False)
            self.decode(0)
        live: list[_Seq] = []  # live[i].slot == i: llama.cpp splits a step over ids that are not consecutive
        while groups or live:
            # Admit prompts while K slots (and, unified, their cells) are free: prompt j of them decodes into
            # slot n + j, after the n live sequences, and is copied to its K - 1 other slots after those.
            new, n_tokens = [], len(live)
            while groups and len(live) + (len(new) + 1) * k <= slots and groups[0].cells <= free_cells \
                    and n_tokens + len(groups[0].context) - len(prefix) <= batch.capacity:
                new.append(groups.popleft())
                free_cells -= new[-1].cells
                n_tokens += len(new[-1].context) - len(prefix)
            if not live and not new:  # cannot happen with the sizing above; never spin
                raise RuntimeError("batched sampler: no prompt fits the sequence slots and KV cache")

            def add_steps():  # one step for every live sequence: its last token, logits out
                for s in live:
                    batch.add(s.ids[-1:], len(s.group.context) + len(s.ids) - 1, s.slot, True)

            def add_prompts():
                for j, g in enumerate(new):
                    if prefix:
                        llama_cpp.llama_memory_seq_cp(self.memory, head, len(live) + j, -1, -1)
                    batch.add(g.context[len(prefix):], len(prefix), len(live) + j, True)

            batch.clear()
            if streams and new and live:  # llama.cpp gives each stream's prompt a batch of its own anyway
                add_prompts()
                prompt_logits = self.decode(len(new)).copy()
                batch.clear()
                add_steps()
                step_logits = self.decode(len(live))
            else:  # one decode: the live sequences' steps, then the new prompts
                add_steps()
                add_prompts()
                logits = self.decode(len(live) + len(new))
                step_logits, prompt_logits = logits[: len(live)], logits[len(live):]
            seqs, prompt_rows, copy_to = list(live), [], len(live) + len(new)
            for j, g in enumerate(new):
                seqs.append(_Seq(g, 0, len(live) + j, candidate_rng(g.seed, 0)))
                for idx in range(1, k):
                    llama_cpp.llama_memory_seq_cp(self.memory, len(live) + j, copy_to, -1, -1)
                    seqs.append(_Seq(g, idx, copy_to, candidate_rng(g.seed, idx)))
                    copy_to += 1
                prompt_rows += [j] * k
            step = np.concatenate([step_logits, prompt_logits[prompt_rows]]) if new else step_logits
            tokens = draw_rows(step, params, [s.rng for s in seqs])
            logps = token_logprobs(step, tokens)
            still, freed = [], []
            for s, token, logp in zip(seqs, tokens.tolist(), logps.tolist()):
                s.ids.append(token)
                s.logps.append(logp)
                finish = "stop" if token in self.eog else "length" if len(s.ids) >= s.group.max_new else None
                if finish is None:
                    still.append(s)
                    continue
                freed.append(s.slot)
                llama_cpp.llama_memory_seq_rm(self.memory, s.slot, -1, -1)
                g = s.group
                g.done.append(make_candidate(self.tokenizer, g.prompt.id, s.idx, s.ids, s.logps, finish))
                if len(g.done) == k:  # the whole prompt is done: its cells are free again, hand it over
                    free_cells += g.cells
                    on_prompt(g.prompt, sorted(g.done, key=lambda c: c.idx))
            # Keep the live sequences in slots 0..n-1: the ones above move down into the freed slots below
            # (a memcpy of the stream, or with a unified cache a relabelling of its cells).
            holes = sorted(slot for slot in freed if slot < len(still))
            for hole, s in zip(holes, [s for s in still if s.slot >= len(still)]):
                llama_cpp.llama_memory_seq_cp(self.memory, s.slot, hole, -1, -1)
                llama_cpp.llama_memory_seq_rm(self.memory, s.slot, -1, -1)
                s.slot = hole
            live = sorted(still, key=lambda s: s.slot)

    def _streams_pay(self, unified_cells: int, slots: int, stream_cells: int) -> bool:
        """kv_cache = "auto": whether this job gets a stream per sequence (see STREAMS_ABOVE_CELLS)."""
        padded = (slots + 1) * -(-stream_cells // STREAM_PAD) * STREAM_PAD
        return unified_cells > STREAMS_ABOVE_CELLS and padded <= STREAMS_MEMORY_RATIO * unified_cells and \
            padded * _kv_bytes_per_cell(self.model) <= STREAMS_RAM_SHARE * _ram_bytes()

    def decode(self, n_out: int) -> np.ndarray:
        """Low level: decode the batch; the logits of its `n_out` output tokens, in batch order (a view, valid
        until the next). `on_decode`, when set, hears (tokens in the batch, n_out, seconds) of every decode."""
        import llama_cpp

        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, self.batch.struct())
        if self.on_decode is not None:
            self.on_decode(self.batch.n, n_out, time.perf_counter() - t0)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) on a batch of {self.batch.n} tokens")
        if not n_out:
            return np.empty((0, self.n_vocab), np.float32)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))


class SequentialSampler(CandidateSampler):
    """One candidate at a time on llama-cpp-python's `Llama` (+ optional GGUF LoRA): the simple fallback
    (`sample.backend = "llamacpp-sequential"`).

    Same interface and the same per-candidate RNG streams as `Sampler`. What it does that the batched one
    cannot: sample with a KV cache for one sequence (when even K sequences' caches do not fit memory) and any K
    (beyond llama.cpp's parallel sequences). The price: ~2.4x slower here (`pudl bench sampling`), and it
    computes with the GGUF's own weight types (on a quantized GGUF, log-probs ~0.2-0.5 off the MLX student's).
    It is also the straightforward reference the batched sampler is tested against.
    """

    def __init__(self, gguf_path: Path, tokenizer, adapter_path: Path | None = None, n_ctx: int = 1024,
                 threads: int = 0):
        import llama_cpp

        kwargs = {"lora_path": str(adapter_path)} if adapter_path is not None else {}
        # The batched sampler's exact attention (float32 cache), so the two agree as far as their weights do.
        self.llm = open_llama(gguf_path, n_ctx=n_ctx, n_threads=threads or os.cpu_count(), n_batch=min(512, n_ctx),
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kwargs)
        self.n_vocab = self.llm.n_vocab()
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.eog = end_of_generation_ids(self.llm.model, tokenizer)

    def close(self):
        """Free the model."""
        self.llm.close()

    def _last_logits(self) -> np.ndarray:
        """Logits after the last decoded token (llama.cpp keeps only those unless logits_all)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,)).copy()

    def _one_prompt(self, prompt: Prompt, params: SamplingParams, seed: int) -> list[Candidate]:
        """K candidates for one prompt; the first decode of the prompt is shared by all of them."""
        context = chat_context(self.tokenizer, prompt, self.n_ctx)
        max_tokens = min(params.max_tokens, self.n_ctx - len(context))
        llm = self.llm
        llm.reset()
        llm.eval(context)
        n_prompt, prompt_logits = llm.n_tokens, self._last_logits()
        out = []
        for idx in range(params.k):
            llm.n_tokens = n_prompt  # rewind: the next eval overwrites the previous candidate's KV
            rng = candidate_rng(seed, idx)
            ids, logps, finish = [], [], "length"
            logits = prompt_logits
            for step in range(max_tokens):
                if step:
                    logits = self._last_logits()
                token = draw(logits, params, rng)
                ids.append(token)
                logps.append(float(log_softmax(logits)[token]))
                if token in self.eog:
                    finish = "stop"
                    break
                llm.eval([token])
            out.append(make_candidate(self.tokenizer, prompt.id, idx, ids, logps, finish))
        return out

    def generate(self, jobs: list[tuple[Prompt, int]], params: SamplingParams, on_prompt: OnPrompt):
        """K candidates for each (prompt, seed), one prompt after another."""
        for prompt, seed in jobs:
            on_prompt(prompt, self._one_prompt(prompt, params, seed))
