"""One way to set up what a recipe runs on: the student's model file, its tokenizer, the MLX student and a
sampler by `sample.backend`.

Every entry point that runs a recipe (`pudl run`, the other ranks of a distributed run, `pudl eval`, `pudl
study` through `pudl run`) builds its student here, so they all train and sample on the same base weights.
"""

from __future__ import annotations

from pathlib import Path

from pudl.models import Tokenizer, load_student, resolve_model_path
from pudl.recipe import Recipe
from pudl.sampling import CandidateSampler


def student_model_path(recipe: Recipe) -> Path:
    """The student GGUF of a recipe (a Hugging Face student converted with student.quant, once, cached)."""
    return resolve_model_path(recipe.student.model, recipe.student.quant)


class Runtime:
    """A recipe's student: model path and tokenizer at once, the MLX student on first use, samplers on demand."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.model_path = student_model_path(recipe)
        self.tokenizer = Tokenizer(self.model_path)
        self._student = None

    @property
    def student(self):
        """The MLX student with the recipe's LoRA (fresh, seeded by run.seed), loaded on first use."""
        if self._student is None:
            r = self.recipe
            self._student = load_student(self.model_path, r.lora.rank, r.lora.alpha, r.lora.targets,
                                         seed=r.run.seed, weights=r.student.weights)
        return self._student

    def load_gguf_adapter(self, path: Path):
        """The MLX student carrying the GGUF LoRA at `path` (its rank, alpha and targets, whatever the recipe's)."""
        from pudl.adapters import read_gguf_lora

        lora = read_gguf_lora(path)
        r = self.recipe
        self._student = load_student(self.model_path, lora.rank, lora.alpha, lora.targets, seed=r.run.seed,
                                     weights=r.student.weights)
        self._student.load_lora_state(lora.state)
        return self._student

    def sampler(self, adapter: Path | None) -> CandidateSampler:
        """A sampler of the student with the GGUF LoRA `adapter` (None: the base model), by sample.backend."""
        s, sample = self.recipe.student, self.recipe.sample
        if sample.backend == "mlx":  # mlx-lm on the MLX student itself
            from pudl.mlx_sampler import MLXSampler

            return MLXSampler(self.student, self.tokenizer, adapter, n_ctx=s.n_ctx)
        from pudl.sampler import Sampler, SequentialSampler

        if sample.backend == "llamacpp-sequential":  # the simple fallback
            return SequentialSampler(self.model_path, self.tokenizer, adapter, n_ctx=s.n_ctx, threads=s.threads)
        return Sampler(self.model_path, self.tokenizer, adapter, n_ctx=s.n_ctx, threads=s.threads,
                       sequences=sample.sequences, kv_cache=sample.kv_cache)
