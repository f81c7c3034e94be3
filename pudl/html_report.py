"""report.html: one self-contained page per run (inline CSS, PNG plots as data URIs; opens offline).

Read from what a run leaves in its directory: metrics.jsonl ('step' rows: loss and reward metrics per optimizer
step), summary.json (per-round ranker agreement, before/after evaluation), eval-*.json, the cache's scores, and
recipe.toml (the resolved recipe, written here when the loop hands the Recipe over). `pudl report RUN_DIR`
rebuilds the page from the same files. Plots use matplotlib's object API with the Agg canvas (no pyplot, no
display, no global backend switch).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from pudl.errors import UserError

MAX_ROUNDS_DRAWN = 6  # score histograms: the latest rounds, one column each
SAMPLE_REPLIES = 12  # before/after replies listed
# step-row keys that are bookkeeping, not metrics; the system panel draws the last two
NOT_METRICS = ("kind", "time", "round", "step", "tokens_per_s", "peak_memory_bytes")


@dataclass
class RunData:
    """Everything the page shows, read from a run directory."""

    run_dir: Path
    summary: dict = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)  # last row per (round, step): a resumed run logs some twice
    evals: dict[str, dict] = field(default_factory=dict)  # "before" / "after" -> eval-*.json
    scores: dict[int, dict[str, dict[str, list[float]]]] = field(default_factory=dict)  # round -> scorer -> pid
    anchor_scores: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    correct: dict[int, dict[str, list[bool]]] = field(default_factory=dict)  # round -> pid -> lenient per candidate
    stages: list[tuple[int, str, bool]] = field(default_factory=list)
    recipe_text: str = ""
    recipe_source: str = ""


def load_run(run_dir: Path) -> RunData:
    """Read a run directory; a file that is missing leaves its part of the page empty (a run still going)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory")
    if not any((run_dir / f).exists() for f in ("summary.json", "metrics.jsonl", "cache.sqlite")):
        raise UserError(f"{run_dir}: not a pudl run directory (no summary.json, metrics.jsonl or cache.sqlite)")
    data = RunData(run_dir)
    if (run_dir / "summary.json").exists():
        data.summary = _read_json(run_dir / "summary.json")
    if (run_dir / "metrics.jsonl").exists():
        latest = {}
        for n, line in enumerate((run_dir / "metrics.jsonl").read_text().splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash mid-write
            if isinstance(row, dict) and row.get("kind") == "step":
                latest[(row.get("round", 1), row.get("step", n))] = row
        data.steps = [latest[k] for k in sorted(latest)]
    for name in ("before", "after"):
        if (run_dir / f"eval-{name}.json").exists():
            data.evals[name] = _read_json(run_dir / f"eval-{name}.json")
        elif data.summary.get(name):
            data.evals[name] = data.summary[name]
    if (run_dir / "cache.sqlite").exists():
        _read_cache(data)
    data.recipe_text, data.recipe_source = _recipe_text(run_dir, data.summary)
    return data


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _read_cache(data: RunData):
    from pudl.cache import Cache
    from pudl.tasks import lenient_match

    cache = Cache.open_read_only(data.run_dir / "cache.sqlite")
    try:
        answers = {pid: row[2] for pid, row in cache.prompt_rows().items() if row[2] is not None}
        data.stages = cache.stage_rows()
        for round_ in cache.rounds():
            data.scores[round_] = {s: cache.scores(round_, s) for s in cache.scorers(round_)}
            data.anchor_scores[round_] = {s: cache.anchor_scores(round_, s) for s in cache.scorers(round_)}
            if answers:
                data.correct[round_] = {pid: [lenient_match(c.text, answers[pid]) for c in cands]
                                        for pid, cands in cache.candidates(round_).items() if pid in answers}
    finally:
        cache.close()


def _recipe_text(run_dir: Path, summary: dict) -> tuple[str, str]:
    """The resolved recipe the run wrote, else the recipe file it names (as it is now), else nothing."""
    if (run_dir / "recipe.toml").exists():
        return (run_dir / "recipe.toml").read_text(errors="replace"), "recipe.toml (as the run resolved it)"
    named = summary.get("recipe")
    if named:
        for candidate in (Path(named), run_dir.parent.parent / named):
            if candidate.is_file():
                return candidate.read_text(errors="replace"), f"{named} (the file as it is now)"
    return "", ""


# plots -------------------------------------------------------------------------------------------
def _figure(n_panels: int, cols: int = 2, height: float = 3.0):
    from matplotlib.figure import Figure

    cols = max(1, min(cols, n_panels))
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(5.2 * cols, height * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _metric_panels(steps: list[dict]) -> list[tuple[str, list[str]]]:
    """Step metrics grouped into panels by their prefix (rewards/..., logps/...); accuracies apart (0..1)."""
    keys = []
    for row in steps:
        for k, v in row.items():
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    panels: dict[str, list[str]] = {}
    for k in keys:
        group = "loss" if k in ("loss", "nll/anchor") else k if k.endswith("accuracies") else k.partition("/")[0]
        panels.setdefault(group, []).append(k)
    order = ["loss", "rewards"]
    return sorted(panels.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


def _smooth(values: list[float], n: int) -> list[float]:
    """Exponential moving average over roughly n points (drawn over the raw, faint curve)."""
    alpha, out, acc = 2.0 / (n + 1), [], None
    for v in values:
        acc = v if acc is None or not math.isfinite(acc) else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_training(steps: list[dict]) -> bytes | None:
    """Loss, reward margins and the other step metrics against the optimizer step (rounds run on)."""
    if not steps:
        return None
    panels = _metric_panels(steps)
    system = [k for k in ("tokens_per_s", "peak_memory_bytes") if any(k in r for r in steps)]
    fig, axes = _figure(len(panels) + bool(system))
    x = list(range(1, len(steps) + 1))
    boundaries = [i + 0.5 for i in range(1, len(steps)) if steps[i].get("round") != steps[i - 1].get("round")]
    for ax, (title, keys) in zip(axes, panels):
        for i, k in enumerate(keys):
            ys = [_float(r.get(k)) for r in steps]
            color = f"C{i}"
            if len(ys) > 20:
                ax.plot(x, ys, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(x, _smooth(ys, max(5, len(ys) // 15)), color=color, label=k, linewidth=1.6)
            else:
                ax.plot(x, ys, color=color, label=k, marker="o", markersize=3)
        if title == "rewards":
            ax.axhline(0.0, color="0.6", linewidth=0.8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    if system:
        ax = axes[-1]
        if "tokens_per_s" in system:
            ax.plot(x, [_float(r.get("tokens_per_s")) for r in steps], color="C0", label="tokens/s")
            ax.set_ylabel("tokens / s")
        if "peak_memory_bytes" in system:
            twin = ax.twinx()
            twin.plot(x, [_float(r.get("peak_memory_bytes")) / 2**30 for r in steps], color="C3",
                      label="peak memory (GiB)")
            twin.set_ylabel("peak memory (GiB)")
            twin.legend(fontsize=8, loc="lower right")
        ax.set_title("throughput and memory")
        ax.legend(fontsize=8, loc="upper left")
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:  # the twin axis too
        ax.ticklabel_format(axis="y", useOffset=False)  # a flat curve reads as its value, not "1e-6 + 0.0787"
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_xlim(0.5, len(steps) + 0.5)  # one step axis for all panels, whichever rounds logged a metric
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        for b in boundaries:
            ax.axvline(b, color="0.4", linestyle=":", linewidth=1)
    return _png(fig)


def plot_accuracy(evals: dict[str, dict]) -> bytes | None:
    """Held-out accuracy of the base model (before) and the final adapter (after): strict, lenient, per family."""
    runs = [(name, evals[name]) for name in ("before", "after") if evals.get(name)]
    if not runs or not any("strict_accuracy" in e for _, e in runs):
        return None
    families = sorted({f for _, e in runs for f in (e.get("strict_by_family") or {})})
    labels = ["strict", "lenient"] + [f"strict\n{f}" for f in families]
    fig, (ax,) = _figure(1, height=3.4)
    fig.set_size_inches(max(6.0, 1.0 * len(labels) + 2), 3.4)
    width = 0.8 / len(runs)
    for i, (name, e) in enumerate(runs):
        values = [_float(e.get("strict_accuracy")), _float(e.get("lenient_accuracy"))]
        values += [_float((e.get("strict_by_family") or {}).get(f)) for f in families]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, values, width, label=f"{name} (n={e.get('n', '?')})", color=f"C{i}")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title("held-out accuracy: base model vs final adapter")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_judge(judge: dict | None) -> bytes | None:
    """The judged comparison as stacked win / tie / loss bars per comparison, with the win rate's 95 % interval."""
    rows = [(k[len("win_rate_"):], v) for k, v in (judge or {}).items()
            if k.startswith("win_rate_") and isinstance(v, dict) and v.get("n")]
    if not rows:
        return None
    fig, (ax,) = _figure(1, height=1.2 + 0.6 * len(rows))
    for i, (name, r) in enumerate(rows):
        left = 0.0
        for key, color in (("win_rate", "C2"), ("tie_rate", "0.75"), ("loss_rate", "C3")):
            ax.barh(i, r[key], left=left, color=color, label=key.split("_")[0] if i == 0 else None)
            left += r[key]
        if r.get("ci95"):
            lo, hi = r["ci95"]
            ax.errorbar([r["win_rate"]], [i], xerr=[[r["win_rate"] - lo], [hi - r["win_rate"]]], color="k", capsize=3)
    ax.set_yticks(range(len(rows)), [f"{n} (n={r['n']})" for n, r in rows], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of valid verdicts (error bar: win rate, 95 % Wilson)")
    ax.legend(fontsize=8, ncol=3, loc="lower right")
    return _png(fig)


def plot_scores(data: RunData) -> bytes | None:
    """Self-rank score histograms per round and scorer: candidates (split correct / incorrect where prompts carry
    answers) and the anchors."""
    rounds = sorted(r for r, by in data.scores.items() if any(by.values()))[-MAX_ROUNDS_DRAWN:]
    if not rounds:
        return None
    scorers = sorted({s for r in rounds for s in data.scores[r]})
    fig, axes = _figure(len(rounds) * len(scorers), cols=len(rounds), height=2.8)
    for row, scorer in enumerate(scorers):
        for col, round_ in enumerate(rounds):
            ax = axes[row * len(rounds) + col]
            by_prompt = data.scores[round_].get(scorer, {})
            anchors = list(data.anchor_scores.get(round_, {}).get(scorer, {}).values())
            every = [s for v in by_prompt.values() for s in v] + anchors
            if not every:
                ax.set_visible(False)
                continue
            lo, hi = min(every), max(every)
            bins = [lo + (hi - lo) * i / 24 for i in range(25)] if hi > lo else 10
            ok = data.correct.get(round_, {})
            if ok:
                right = [s for pid, v in by_prompt.items() for s, c in zip(v, ok.get(pid, [])) if c]
                wrong = [s for pid, v in by_prompt.items() for s, c in zip(v, ok.get(pid, [])) if not c]
                rest = [s for pid, v in by_prompt.items() if pid not in ok for s in v]
                parts = [(right, "candidates, correct", "C2"), (wrong, "candidates, incorrect", "C3"),
                         (rest, "candidates, no answer", "C7")]
                parts = [p for p in parts if p[0]]
                ax.hist([p[0] for p in parts], bins=bins, stacked=True, label=[p[1] for p in parts],
                        color=[p[2] for p in parts])
            else:
                ax.hist([s for v in by_prompt.values() for s in v], bins=bins, label="candidates", color="C0")
            if anchors:
                ax.hist(anchors, bins=bins, histtype="step", linewidth=1.6, color="k", label="anchors")
            ax.set_title(f"round {round_} · {scorer}", fontsize=10)
            ax.set_xlabel("score (higher ranks first)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _png(fig)


RANKER_PANELS = (("auc", "AUC: a correct candidate outscores an incorrect one"),
                 ("best_vs_worst_correct", "mixed groups: best correct and worst incorrect"),
                 ("spearman_within", "rank correlation with correctness within groups"))


def plot_ranker(per_round: list[dict]) -> bytes | None:
    """Per round: how well each self-ranking score agrees with answer correctness (0.5 = chance for the
    first two panels, 0 for the correlation). None when no round has a finite figure (no answers, or every
    candidate equally right or wrong)."""
    rows = [r for r in per_round if r.get("ranker")]
    scorers = sorted({s for r in rows for s in r["ranker"]})

    def series(scorer: str, key: str) -> list[float]:
        values = [(r["ranker"].get(scorer) or {}).get(key) for r in rows]
        return [float(v) if isinstance(v, (int, float)) else math.nan for v in values]

    panels = [(k, t) for k, t in RANKER_PANELS
              if any(math.isfinite(v) for s in scorers for v in series(s, k))]
    if not panels:
        return None
    fig, axes = _figure(len(panels), cols=len(panels), height=3.0)
    xs = [r["round"] for r in rows]
    for ax, (key, title) in zip(axes, panels):
        for i, scorer in enumerate(scorers):
            ax.plot(xs, series(scorer, key), marker="o", color=f"C{i}", label=scorer)
        chance = 0.0 if key.startswith("spearman") else 0.5
        ax.axhline(chance, color="0.5", linestyle="--", linewidth=1, label="chance")
        ax.set_ylim(-1.05 if chance == 0.0 else 0, 1.05)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


# page --------------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1100px;padding:1.2em;
color:#1d2430;background:#fff}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #dde;
padding-bottom:.2em}
.sub{color:#667}table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #dde;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f3f5f9}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:.6em 0}figure{margin:0}figcaption{color:#556;font-size:.92em}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:12px;max-height:36em}
.note{color:#667;font-style:italic}.good{color:#1a7f37}.bad{color:#b42318}
"""


def _cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="n">{"—" if math.isnan(value) else f"{value:.3f}"}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="n">{value}</td>'
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


def _table(header: list[str] | None, rows: list[list]) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _image(png: bytes | None, alt: str, caption: str, missing: str) -> str:
    if png is None:
        return f'<p class="note">{html.escape(missing)}</p>'
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" src="{uri}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _summary_rows(s: dict, evals: dict) -> list[list]:
    rows = [["recipe", s.get("recipe")], ["rounds", s.get("rounds")], ["prompts", s.get("prompts")],
            ["teacher calls (this run)", s.get("teacher_calls")], ["teacher failures", s.get("teacher_failures")],
            ["prompts skipped (too long)", len(s.get("skipped_too_long") or [])],
            ["wall time (s)", s.get("wall_seconds")], ["adapter", s.get("adapter")]]
    rows += [[f"cache: {k}", v] for k, v in (s.get("cache") or {}).items()]
    for key in ("strict_accuracy", "lenient_accuracy", "anchor_score"):
        if any(key in (evals.get(n) or {}) for n in ("before", "after")):
            rows.append([f"held-out {key}: before → after",
                         f"{_num((evals.get('before') or {}).get(key))} → {_num((evals.get('after') or {}).get(key))}"])
    return [r for r in rows if r[1] is not None]


def _num(v) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _round_rows(per_round: list[dict]) -> tuple[list[str], list[list]]:
    scorers = sorted({s for r in per_round for s in (r.get("ranker") or {})})
    header = ["round", "candidates", "pairs", "groups", "group status"] + [f"AUC {s}" for s in scorers]
    rows = []
    for r in per_round:
        status = ", ".join(f"{k} {v}" for k, v in sorted((r.get("group_status") or {}).items()))
        rows.append([r.get("round"), r.get("candidates"), r.get("pairs"), r.get("groups"), status]
                    + [_float((r.get("ranker") or {}).get(s, {}).get("auc")) for s in scorers])
    return header, rows


def _split_rows(evals: dict) -> list[list] | None:
    """One row per held-out split (and one for all prompts): before/after strict and lenient accuracy and
    retention; None when neither evaluation reports splits."""
    from pudl.tasks import SPLITS

    before, after = evals.get("before") or {}, evals.get("after") or {}
    present = [s for s in SPLITS if s in (before.get("splits") or {}) or s in (after.get("splits") or {})]
    if not present:
        return None
    kept = _retention(before, after)
    by_b, by_a = before.get("splits") or {}, after.get("splits") or {}
    groups = [(s, by_b.get(s) or {}, by_a.get(s) or {}, kept.get(s)) for s in present]
    return [_split_row(*g) for g in groups + [("all", before, after, kept.get("overall"))]]


def _split_row(name: str, b: dict, a: dict, kept: dict | None) -> list:
    """split, n, strict before/after, lenient before/after, retention, kept / right before."""
    kept = kept or {}
    return [name, b.get("n", a.get("n")), _float(b.get("strict_accuracy")), _float(a.get("strict_accuracy")),
            _float(b.get("lenient_accuracy")), _float(a.get("lenient_accuracy")), _float(kept.get("retention")),
            f"{kept['kept']} / {kept['right_before']}" if kept else None]


def _retention(before: dict, after: dict) -> dict:
    """`pudl.evaluate.retention` when both evaluations hold replies of the same prompts, else {}."""
    if not before.get("replies") or not after.get("replies"):
        return {}
    from pudl.evaluate import retention

    try:
        return retention(before, after)
    except UserError:
        return {}


def _float(v) -> float:
    """A number for a table cell; a missing one shows as a dash."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


SPLIT_HEADER = ["split", "n", "strict before", "strict after", "lenient before", "lenient after", "retention",
                "kept / right before"]


def _splits(evals: dict) -> list[str]:
    """The held-out splits section (heading, note, table), or nothing when no split is reported."""
    rows = _split_rows(evals)
    if rows is None:
        return []
    note = ("Held-out prompts by split (ids <split>/<family>-<n>): in-distribution = new facts in the training "
            "wordings, new-wording = the same facts asked in wordings training never used, new-task = operations "
            "training never shows. Retention: of the prompts the base model answered right (lenient), the share "
            "the final adapter still answers right.")
    return ["<h2>Held-out splits</h2>", f"<p class='sub'>{html.escape(note)}</p>", _table(SPLIT_HEADER, rows)]


def _open_ended(evals: dict, summary: dict) -> list[str]:
    """Reference metrics (chrF, ROUGE-L against the teacher's answers), the judged comparison and the teacher's
    ledger; nothing for a run that has none of them."""
    before, after = evals.get("before") or {}, evals.get("after") or {}
    parts = []
    rb, ra = before.get("reference") or {}, after.get("reference") or {}
    if rb or ra:
        rows = [[k, _float(rb.get(k)), _float(ra.get(k)), ra.get("n", rb.get("n"))] for k in ("chrf", "rouge_l")]
        parts += ["<h2>Against the teacher's reference answers</h2>",
                  "<p class='sub'>The teacher answered each held-out prompt once; chrF (character n-grams) and "
                  "ROUGE-L (longest common word subsequence) of the greedy replies against it, mean over prompts.</p>",
                  _table(["metric", "before", "after", "n"], rows)]
    judge = after.get("judge") or {}
    rows = [[k[len("win_rate_"):], _float(v.get("win_rate")), _float(v.get("tie_rate")), _float(v.get("loss_rate")),
             v.get("n"), v.get("invalid"), v.get("missing"),
             "—" if not v.get("ci95") else f"{v['ci95'][0]:.2f} – {v['ci95'][1]:.2f}"]
            for k, v in judge.items() if k.startswith("win_rate_") and isinstance(v, dict)]
    if rows:
        parts += ["<h2>Judged comparison</h2>",
                  f"<p class='sub'>{html.escape(str(judge.get('judge', '')))} compared the final adapter's reply with "
                  "the base model's (vs_before) and with the teacher's answer (vs_teacher), each pair in both orders; "
                  "rates over valid verdicts (a reply that is not A, B or tie is invalid, not a tie).</p>",
                  _table(["comparison", "win", "tie", "loss", "n", "invalid", "missing", "win 95 % (Wilson)"], rows),
                  _image(plot_judge(judge), "judged win / tie / loss", "Win / tie / loss of the final adapter.",
                         "No valid verdict yet.")]
    ledger = summary.get("ledger") or {}
    rows = [[p, v["calls"], v["prompt_tokens"], v["completion_tokens"], float(v["seconds"])]
            for p, v in ledger.items() if p != "cost" and isinstance(v, dict)]
    if rows:
        cost = ledger.get("cost")
        parts += ["<h2>Teacher ledger</h2>",
                  "<p class='sub'>Every teacher request over the life of the cache, per purpose"
                  + (f"; cost {cost['total']:.4f} at {cost['price_in']:g} / {cost['price_out']:g} per million "
                     "prompt / completion tokens" if cost else "") + ".</p>",
                  _table(["purpose", "calls", "prompt tokens", "completion tokens", "seconds"], rows)]
    return parts


def _replies(evals: dict) -> str:
    before = {r["id"]: r for r in (evals.get("before") or {}).get("replies", [])}
    after = {r["id"]: r for r in (evals.get("after") or {}).get("replies", [])}
    ids = [i for i in before if i in after][:SAMPLE_REPLIES]
    if not ids:
        return ""

    def mark(r):
        if "strict" not in r:  # a prompt without an answer key
            return ""
        return "✓" if r.get("strict") else "~" if r.get("lenient") else "✗"

    rows = [[i, f"{mark(before[i])} {before[i].get('reply', '')}", f"{mark(after[i])} {after[i].get('reply', '')}"]
            for i in ids]
    return ("<h2>Held-out replies (first %d)</h2><p class='sub'>✓ strict match, ~ lenient only, ✗ neither</p>"
            % len(ids)) + _table(["prompt", "before", "after"], rows)


def render_html(data: RunData) -> str:
    """The page: summary, plots, per-round table, stages, sample replies, recipe."""
    s = data.summary
    title = f"pudl run · {data.run_dir.name}"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='sub'>{html.escape(str(data.run_dir.resolve()))}"
             + ("" if s else " · <b>no summary.json yet: the run has not finished</b>") + "</p>",
             "<h2>Summary</h2>", _table(None, _summary_rows(s, data.evals))]
    algo_note = "pairwise DPO" if any("logps/chosen" in r for r in data.steps) else "listwise: chosen = best-ranked"
    parts += ["<h2>Training</h2>", _image(
        plot_training(data.steps), "training metrics per step",
        f"Per optimizer step ({algo_note}); rewards are beta x the policy/reference log-ratio of the chosen and "
        "rejected sides, margins their gap. Dotted lines separate rounds; long curves are smoothed (faint: raw).",
        "No training steps logged yet.")]
    parts += ["<h2>Held-out accuracy</h2>", _image(
        plot_accuracy(data.evals), "held-out accuracy before and after",
        "Evaluated once before training (the base model) and once after the last round (its adapter); greedy "
        "replies, strict = exact answer, lenient = the answer appears as a word.",
        "No held-out evaluation (set data.eval to prompts with answers).")]
    parts += _splits(data.evals)
    parts += _open_ended(data.evals, s)
    parts += ["<h2>Self-ranking scores</h2>", _image(
        plot_scores(data), "score distributions per round",
        "Anchor-conditioned self-ranking scores of the sampled candidates per round"
        + (f" (latest {MAX_ROUNDS_DRAWN} rounds)" if len(data.scores) > MAX_ROUNDS_DRAWN else "")
        + "; where prompts carry answers, candidates are split by lenient correctness. Outline: the anchors.",
        "No scores in the cache yet.")]
    parts += ["<h2>Self-ranker vs verifier</h2>", _image(
        plot_ranker(s.get("per_round") or []), "self-ranker agreement with the verifier",
        "Does the student's own anchor-conditioned ranking put correct candidates first? Only prompts with an "
        "answer count; 0.5 is chance.",
        "No agreement figures: the training prompts carry no answers (or the run has not finished a round).")]
    if s.get("per_round"):
        header, rows = _round_rows(s["per_round"])
        parts += ["<h2>Rounds</h2>", _table(header, rows)]
    if s.get("phase_seconds"):
        parts += ["<h2>Time per phase (s)</h2>", _table(["phase", "seconds"],
                                                        [[k, float(v)] for k, v in s["phase_seconds"].items()])]
    if data.stages:
        status = s.get("stages") or {}
        rows = [[r, st, "finished" if done else "interrupted", (status.get(str(r)) or {}).get(st, "")]
                for r, st, done in data.stages]
        parts += ["<h2>Stages in the cache</h2>", _table(["round", "stage", "state", "last run"], rows)]
    parts.append(_replies(data.evals))
    parts.append("<h2>Recipe</h2>")
    if data.recipe_text:
        parts += [f"<p class='sub'>{html.escape(data.recipe_source)}</p>", f"<pre>{html.escape(data.recipe_text)}</pre>"]
    else:
        parts.append("<p class='note'>The recipe file was not found.</p>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(run_dir: Path, recipe=None) -> Path:
    """Write RUN_DIR/report.html (and, given the run's Recipe, RUN_DIR/recipe.toml as resolved); return its path."""
    run_dir = Path(run_dir)
    if recipe is not None:
        from pudl.init_recipe import resolved_recipe

        _write_text(run_dir / "recipe.toml", resolved_recipe(recipe))
    path = run_dir / "report.html"
    _write_text(path, render_html(load_run(run_dir)))
    return path


def _write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
