"""`pudl study STUDY.toml`: several recipes ("arms") x seeds on the same prompts, one table at the end.

Each arm x seed is an ordinary `pudl run` of a recipe with `--set` overrides in its own run directory
(<out>/<arm>/seed-<s>), so a rerun of the study resumes every arm from its cache, and a finished arm is not
even reopened (its result is kept in study-arm.json under a fingerprint of its recipe). The `base` arm is
the untrained student: the held-out evaluation every run makes before training (`before` in summary.json).

The study checks that every trained arm draws on the same teacher budget: the same training prompts and the
same teacher settings, so each arm's anchors are the same one call per prompt.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pudl.atomic_files import dumps
from pudl.cache import Cache, fingerprint
from pudl.errors import UserError
from pudl.recipe import Recipe, load_recipe

METRICS = ("strict_accuracy", "lenient_accuracy", "teacher_calls", "tokens_sampled", "wall_seconds")
SPLIT_METRICS = ("strict_accuracy", "lenient_accuracy", "retention")
STUDY_KEYS = {"out", "recipe", "seeds", "set", "seed_cache", "title"}
ARM_KEYS = {"name", "recipe", "set", "base", "label", "cache_from"}


@dataclass(frozen=True)
class Arm:
    name: str
    recipe: str = ""  # empty: the study's recipe
    overrides: tuple[str, ...] = ()
    base: bool = False  # the untrained student (no run of its own)
    label: str = ""
    cache_from: str = ""  # an earlier arm whose same-seed run cache this arm starts from


@dataclass(frozen=True)
class Study:
    path: str
    out: str
    recipe: str
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()
    seed_cache: str = ""  # a finished run dir whose cache each new arm starts from
    title: str = "pudl study"
    arms: tuple[Arm, ...] = field(default_factory=tuple)


def _strings(value, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{key}: expected a list of strings like \"train.algo=sft\", got {value!r}")
    return tuple(value)


def load_study(path: str | Path) -> Study:
    """Read and check a study file; paths in it are relative to it (out: to the current directory)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: study file not found")
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None
    for key in data:
        if key not in ("study", "arm"):
            raise UserError(f"{path}: [{key}]: unknown section (known: study, [[arm]])")
    s = data.get("study", {})
    for key in s:
        if key not in STUDY_KEYS:
            raise UserError(f"{path}: study.{key}: unknown key (known: {', '.join(sorted(STUDY_KEYS))})")
    base = path.parent

    def local(value: str, key: str) -> str:
        p = base / value
        if not p.exists():
            raise UserError(f"{path}: {key}: not found: {p}")
        return str(p)

    if not isinstance(s.get("recipe"), str):
        raise UserError(f"{path}: study.recipe: required (the recipe the arms start from)")
    seeds = s.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise UserError(f"{path}: study.seeds: expected a non-empty list of integers, got {seeds!r}")
    arms, names = [], set()
    for i, a in enumerate(data.get("arm", [])):
        where = f"{path}: arm {i + 1}"
        for key in a:
            if key not in ARM_KEYS:
                raise UserError(f"{where}: {key}: unknown key (known: {', '.join(sorted(ARM_KEYS))})")
        name = a.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise UserError(f"{where}: name: required, letters, digits, '-', '_' or '.' (it names a directory)")
        if name in names:
            raise UserError(f"{where}: name: {name!r} appears twice")
        cache_from = a.get("cache_from", "")
        if cache_from and (cache_from not in names or any(b.base for b in arms if b.name == cache_from)):
            raise UserError(f"{where}: cache_from: {cache_from!r} is not a trained arm listed before {name!r}")
        names.add(name)
        arms.append(Arm(name, local(a["recipe"], f"arm {name}: recipe") if "recipe" in a else "",
                        _strings(a.get("set", []), f"{where}: set"), bool(a.get("base", False)),
                        str(a.get("label", "")), str(cache_from)))
    if not any(not a.base for a in arms):
        raise UserError(f"{path}: at least one [[arm]] that trains is needed (the base arm reads its evaluation)")
    return Study(str(path), s.get("out") or str(Path("runs") / f"study-{path.stem}"), local(s["recipe"], "study.recipe"),
                 tuple(seeds), _strings(s.get("set", []), f"{path}: study.set"),
                 local(s["seed_cache"], "study.seed_cache") if s.get("seed_cache") else "",
                 str(s.get("title", "pudl study")), tuple(arms))


def arm_recipe(study: Study, arm: Arm, seed: int) -> Recipe:
    out = Path(study.out) / arm.name / f"seed-{seed}"
    return load_recipe(arm.recipe or study.recipe, str(out), [*study.overrides, *arm.overrides, f"run.seed={seed}"])


def _budget(recipe: Recipe) -> tuple:
    """What decides the teacher calls: the training prompts and how the teacher is asked."""
    return (Path(recipe.data.prompts).read_bytes(), recipe.section_dict("teacher"), recipe.student.n_ctx)


def _seed_from(source: Path, run_dir: Path):
    """Start a new arm from a copy of a finished run's cache (anchors, samples, scores) and its base
    evaluation: stages whose fingerprints match are reused, the rest are recomputed as usual."""
    if (run_dir / "cache.sqlite").exists() or not (source / "cache.sqlite").exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    source_cache = Cache(source / "cache.sqlite")
    try:
        source_cache.copy_to(run_dir / "cache.sqlite")
    finally:
        source_cache.close()
    if (source / "eval-before.json").exists():
        shutil.copyfile(source / "eval-before.json", run_dir / "eval-before.json")


def _recipe_key(recipe: Recipe) -> str:
    return fingerprint(dataclasses.asdict(dataclasses.replace(recipe, path="")))


def run_arm(study: Study, arm: Arm, seed: int, reporter_factory, say, execute: bool = True) -> dict | None:
    """Run (or resume, or reuse) one trained arm x seed; return its row (None: not run and `execute` is off)."""
    from pudl.loop import run

    recipe = arm_recipe(study, arm, seed)
    run_dir = Path(recipe.run.out)
    record = run_dir / "study-arm.json"
    key = _recipe_key(recipe)
    kept = {}
    if record.exists() and (run_dir / "summary.json").exists():
        kept = json.loads(record.read_text())
        if kept.get("recipe_key") == key:
            say(f"{arm.name} seed {seed}: done before (kept in {record})")
            return kept["row"]
    if not execute:
        say(f"{arm.name} seed {seed}: not run yet (left out by --arm)")
        return None
    if arm.cache_from:  # e.g. the same candidates and scores: identical by seeding, so only computed once
        _seed_from(Path(study.out) / arm.cache_from / f"seed-{seed}", run_dir)
    elif study.seed_cache:
        _seed_from(Path(study.seed_cache), run_dir)
    say(f"{arm.name} seed {seed}: running {recipe.path} in {run_dir}")
    t0 = time.perf_counter()
    summary = run(recipe, reporter_factory)
    wall = time.perf_counter() - t0
    after, before = summary.get("after") or {}, summary.get("before") or {}
    row = {"arm": arm.name, "seed": seed, "run_dir": str(run_dir),
           "strict_accuracy": after.get("strict_accuracy"), "lenient_accuracy": after.get("lenient_accuracy"),
           "strict_by_family": after.get("strict_by_family"),
           "teacher_calls": summary.get("anchors_used"), "tokens_sampled": summary.get("tokens_sampled"),
           "wall_seconds": round(wall, 1), "phase_seconds": summary.get("phase_seconds"),
           "reused_stages": summary.get("stages"),
           "ranker": (summary.get("per_round") or [{}])[-1].get("ranker"), "before": before,
           **split_fields(after, summary.get("retention"))}
    stages = [status for by_stage in (summary.get("stages") or {}).values() for status in by_stage.values()]
    if kept.get("row") and stages and all(status == "reused" for status in stages):
        # Nothing was computed (e.g. a recipe key that does not touch any stage): the arm's cost is still the
        # run that computed its stages, not this check.
        row["wall_seconds"], row["phase_seconds"] = kept["row"]["wall_seconds"], kept["row"]["phase_seconds"]
    record.write_text(dumps({"recipe_key": key, "row": row}, indent=1))
    return row


def base_row(rows: list[dict], seed: int) -> dict:
    """The untrained student: the base evaluation of a trained arm of this seed (identical across arms)."""
    source = next((r for r in rows if r["seed"] == seed and r.get("before")), None)
    if source is None:
        return None
    b = source["before"]
    return {"arm": "base", "seed": seed, "run_dir": source["run_dir"], "strict_accuracy": b.get("strict_accuracy"),
            "lenient_accuracy": b.get("lenient_accuracy"), "strict_by_family": b.get("strict_by_family"),
            "teacher_calls": 0, "tokens_sampled": 0,
            "wall_seconds": round((source.get("phase_seconds") or {}).get("eval before", 0.0), 1),
            **split_fields(b, None)}


def split_fields(result: dict, retention: dict | None) -> dict:
    """A run's figures per held-out split (pudl.tasks.SPLITS: in-distribution, new-wording, new-task) as flat
    row fields "<split>/strict_accuracy", "/lenient_accuracy", "/retention" (None for the base student)."""
    out = {}
    for split, figures in (result.get("splits") or {}).items():
        out[f"{split}/strict_accuracy"] = figures.get("strict_accuracy")
        out[f"{split}/lenient_accuracy"] = figures.get("lenient_accuracy")
        out[f"{split}/retention"] = ((retention or {}).get(split) or {}).get("retention")
    return out


def _mean_std(values: list) -> tuple[float, float]:
    v = np.array([x for x in values if x is not None], float)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def aggregate(study: Study, rows: list[dict]) -> dict:
    """Mean and std over seeds of every metric, per arm, in the study's arm order."""
    arms = []
    for arm in study.arms:
        mine = [r for r in rows if r["arm"] == arm.name]
        stats = {m: dict(zip(("mean", "std"), _mean_std([r.get(m) for r in mine]))) for m in _metrics(rows)}
        arms.append({"arm": arm.name, "label": arm.label or arm.name, "seeds": [r["seed"] for r in mine], **stats})
    return {"title": study.title, "study": study.path, "seeds": list(study.seeds), "arms": arms, "runs": rows}


def _metrics(rows: list[dict]) -> tuple[str, ...]:
    """METRICS, then the per-split fields any row has, in SPLITS order."""
    from pudl.tasks import SPLITS

    present = {k for r in rows for k in r}
    return METRICS + tuple(f"{s}/{m}" for s in SPLITS for m in SPLIT_METRICS if f"{s}/{m}" in present)


def _fmt(stat: dict, digits: int) -> str:
    mean, std = stat["mean"], stat["std"]
    if mean != mean:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(result: dict) -> str:
    lines = [f"# {result['title']}", "",
             f"Seeds: {', '.join(map(str, result['seeds']))}; mean ± std over seeds (std 0 with one seed). "
             "Teacher calls = anchors the arm trained on (the same budget for every trained arm); tokens sampled = "
             "candidate tokens generated for training; wall = this arm's own run time (stages reused from a "
             "seeded cache excluded).", "",
             "| arm | held-out strict | lenient | teacher calls | tokens sampled | wall s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for a in result["arms"]:
        lines.append(f"| {a['label']} | {_fmt(a['strict_accuracy'], 3)} | {_fmt(a['lenient_accuracy'], 3)} | "
                     f"{_fmt(a['teacher_calls'], 0)} | {_fmt(a['tokens_sampled'], 0)} | {_fmt(a['wall_seconds'], 0)} |")
    splits = list(dict.fromkeys(k.split("/")[0] for a in result["arms"] for k in a if "/" in k))
    if splits:
        lines += ["", "Per held-out split: strict / lenient / retention (of the prompts the base student answered "
                  "leniently right, the share still answered right; the base student itself: —).", "",
                  "| arm | " + " | ".join(splits) + " |", "| --- |" + " --- |" * len(splits)]
        for a in result["arms"]:
            cells = [" / ".join(_fmt(a.get(f"{s}/{m}", {"mean": float("nan"), "std": 0.0}), 2) for m in SPLIT_METRICS)
                     for s in splits]
            lines.append(f"| {a['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(result: dict, path: Path):
    """Strict and lenient held-out accuracy per arm that has results, with std error bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    # arms not run yet (mean nan) are left out, not drawn as zeros
    arms = [a for a in result["arms"] if a["strict_accuracy"]["mean"] == a["strict_accuracy"]["mean"]]
    x = np.arange(len(arms))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(arms) + 2), 3.6))
    for offset, metric, name in ((-0.2, "strict_accuracy", "strict"), (0.2, "lenient_accuracy", "lenient")):
        means = [a[metric]["mean"] for a in arms]
        stds = [a[metric]["std"] for a in arms]
        ax.bar(x + offset, np.nan_to_num(means), 0.4, yerr=np.nan_to_num(stds), capsize=3, label=name)
    ax.set_xticks(x, [a["label"] for a in arms], rotation=20, ha="right")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(result["title"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_study(study: Study, reporter_factory, say=print, only: tuple[str, ...] = ()) -> dict:
    """Run every arm x seed (resuming; with `only`, just those arms, the others' finished results are still
    reported), then write study.json, study.md and study.png under study.out."""
    unknown = set(only) - {a.name for a in study.arms}
    if unknown:
        raise UserError(f"--arm {sorted(unknown)[0]}: no such arm in {study.path} "
                        f"(arms: {', '.join(a.name for a in study.arms)})")
    trained = [a for a in study.arms if not a.base]
    recipes = {a.name: arm_recipe(study, a, study.seeds[0]) for a in trained}  # every recipe checked up front
    budgets = {name: _budget(r) for name, r in recipes.items()}
    first = trained[0].name
    for name, b in budgets.items():
        if b != budgets[first]:
            raise UserError(f"{study.path}: arm {name} does not use the same training prompts and teacher as "
                            f"arm {first}: the arms must share one teacher-call budget")
    out = Path(study.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in study.seeds:
        for arm in trained:
            row = run_arm(study, arm, seed, reporter_factory, say, execute=not only or arm.name in only)
            if row is not None:
                rows.append(row)
    base_rows = [(a, base_row(rows, seed)) for a in study.arms if a.base for seed in study.seeds]
    rows += [{**row, "arm": a.name} for a, row in base_rows if row is not None]
    result = aggregate(study, rows)
    (out / "study.json").write_text(dumps(result, indent=1))  # an arm without results: null
    (out / "study.md").write_text(markdown(result))
    bar_chart(result, out / "study.png")
    return result
