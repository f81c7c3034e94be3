"""The `pudl` command line: run, study, eval, doctor.

A mistake a user can make (recipe, files, model) is printed as one line and exits with code 2; Linux users
get the fast BLAS without doing anything (the process re-executes itself with OpenBLAS preloaded).
"""

from __future__ import annotations

import json
import signal

import click
from rich.console import Console
from rich.markup import escape

from pudl.atomic_files import dumps
from pudl.cache_cli import cache
from pudl.cli_errors import err_console, user_errors
from pudl.errors import UserError

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pudl")
def main():
    """pudl: positive-unlabeled RL distillation of a small model, offline, on one machine.

    The teacher answers each prompt once (the anchor); the student samples K candidates, ranks them
    itself with the anchor in context, and learns from the ranking with LoRA. Start with
    `pudl run recipes/demo.toml`.
    """


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (overrides run.out).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe value, e.g. --set rank.pairs=best-vs-worst (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress bars; only the final summary.")
@user_errors
def run(recipe, out, overrides, quiet):
    """Run RECIPE (TOML) end to end: anchors, sampling, self-ranking, training, export, evaluation.

    Everything is cached in the run directory: rerunning the same recipe resumes where it stopped and
    never asks the teacher again for a prompt it already answered.
    """
    from pudl.recipe import load_recipe

    r = load_recipe(recipe, out, list(overrides))  # before the heavy imports: a bad recipe fails at once
    from pudl.loop import run as run_recipe
    from pudl.report import Reporter

    summary = run_recipe(r, lambda d: Reporter(d, err_console, quiet=quiet))
    if summary is not None:  # None: a rank > 0 of a distributed run (rank 0 reports)
        _print_summary(summary)


def _print_summary(summary: dict):
    console = Console()
    b, a = summary.get("before") or {}, summary.get("after") or {}
    console.print(f"[bold]run finished[/] in {summary['wall_seconds']:.0f} s · teacher calls this run: "
                  f"{summary['teacher_calls']} · adapter: {summary['adapter']}")
    failed, too_long = summary.get("teacher_failed") or {}, summary.get("skipped_too_long") or []
    if failed:
        console.print(f"[yellow]teacher failed for {len(failed)} prompt(s), left out of this run; rerun to ask "
                      f"again: {escape(', '.join(sorted(failed)))} (errors in summary.json)", highlight=False)
    if too_long:
        console.print(f"[yellow]{len(too_long)} prompt(s) longer than student.n_ctx skipped: "
                      f"{escape(', '.join(too_long))}", highlight=False)
    held = summary.get("held_out") or {}
    if held.get("source") == "data.eval_fraction" and held.get("n"):
        console.print(f"held out {held['n']} prompt(s) of data.prompts for evaluation (data.eval_fraction = "
                      f"{held['fraction']:g}; never trained on; ids in summary.json)", highlight=False)
    for key in ("strict_accuracy", "lenient_accuracy", "anchor_score"):
        if key in b or key in a:
            console.print(f"  held-out {key:<17} before {b.get(key, float('nan')):.3f}  after {a.get(key, float('nan')):.3f}")
    for line in _open_ended_lines(b, a):
        console.print(line, highlight=False)
    from pudl.ledger import lines

    for line in lines(summary.get("ledger") or {}):
        console.print(f"  teacher ledger · {line}", highlight=False)


def _open_ended_lines(b: dict, a: dict) -> list[str]:
    """Reference metrics before/after and the judged win rates, for a run's or an evaluation's summary."""
    out = []
    rb, ra = b.get("reference") or {}, a.get("reference") or {}
    for key in ("chrf", "rouge_l"):
        if key in rb or key in ra:
            out.append(f"  held-out {key + ' vs teacher':<17} before {_num(rb.get(key))}  after {_num(ra.get(key))}"
                       f"  (n {ra.get('n', rb.get('n'))})")
    for key, row in (a.get("judge") or {}).items():
        if key.startswith("win_rate_") and isinstance(row, dict):
            ci = row.get("ci95")
            out.append(f"  judged {key[len('win_rate_'):]:<17} win {_num(row['win_rate'])}  tie {_num(row['tie_rate'])}  "
                       f"loss {_num(row['loss_rate'])}  (n {row['n']}, invalid {row['invalid']}, 95 % Wilson "
                       f"{'-' if ci is None else f'{ci[0]:.2f}-{ci[1]:.2f}'})")
    return out


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


@main.command()
@click.argument("study_file", metavar="STUDY.toml", type=click.Path(dir_okay=False))
@click.option("--arm", "arms", multiple=True, metavar="NAME",
              help="Run only this arm (repeatable; e.g. two studies side by side); the table still shows "
                   "every arm finished so far.")
@click.option("--quiet", is_flag=True, help="No progress bars; one line per arm and the final table.")
@user_errors
def study(study_file, arms, quiet):
    """Run every arm of STUDY.toml (a recipe + overrides) for each seed and compare them.

    Each arm x seed is a `pudl run` in its own directory under study.out, so rerunning the study resumes
    where it stopped and skips finished arms. All trained arms must use the same training prompts and
    teacher (one teacher-call budget). Writes study.md, study.json and study.png (mean ± std over seeds of
    held-out strict/lenient accuracy, teacher calls, tokens sampled, wall time). Example:
    studies/quality.toml.
    """
    from pudl.report import Reporter
    from pudl.study import load_study, run_study

    s = load_study(study_file)
    result = run_study(s, lambda d: Reporter(d, err_console, quiet=quiet),
                       say=lambda m: err_console.print(escape(m), highlight=False), only=tuple(arms))
    from pudl.study import markdown

    click.echo(markdown(result))
    click.echo(f"written: {s.out}/study.md, study.json, study.png")


@main.command("eval")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--adapter", type=click.Path(dir_okay=False), help="GGUF LoRA to evaluate (e.g. RUN/adapter.gguf).")
@click.option("--prompts", type=click.Path(dir_okay=False), help="Prompts JSONL (default: the recipe's data.eval).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the whole result, replies included, here.")
@click.option("--before", type=click.Path(dir_okay=False),
              help="A result written by `pudl eval --out` for the base student on the same prompts: adds "
                   "retention (of what it answered right, the share this student still answers right).")
@click.option("--judge", type=click.Choice(["none", "teacher"]), default=None,
              help="Judged comparison (eval.judge): the adapter's replies against the base student's (--before, "
                   "else evaluated now) and the teacher's, both orders; verdicts cached in the recipe's run "
                   "directory, shared with `pudl run`.")
@user_errors
def eval_(recipe, adapter, prompts, as_json, out, before, judge):
    """Evaluate the student of RECIPE (optionally with an adapter) on held-out prompts.

    Reports strict and lenient accuracy (prompts with an `answer`), per held-out split when the prompt ids
    name one (e.g. recipes/data/tasks-eval-splits.jsonl: in-distribution, new-wording, new-task), and the
    anchor score (mean token log-prob of the reference answer under the student). Without --prompts and
    data.eval, the prompts `pudl run` held out (data.eval_fraction). Where the recipe's run directory has a
    cache (or with --judge), chrF and ROUGE-L against the teacher's reference answers (eval.references).
    """
    from pathlib import Path

    from pudl.atomic_files import write_json
    from pudl.evaluate import evaluate, retention
    from pudl.prompts import load_prompts
    from pudl.recipe import load_recipe
    from pudl.report import Reporter
    from pudl.runtime import Runtime

    r = load_recipe(recipe, overrides=[f"eval.judge={judge}"] if judge else None)
    path = prompts or r.data.eval or r.data.prompts
    items = load_prompts(path)
    if not prompts and not r.data.eval:  # the share `pudl run` held out of data.prompts
        from pudl.loop import holdout_ids

        held = set(holdout_ids([p.id for p in items], r.data.eval_fraction, r.run.seed))
        items = [p for p in items if p.id in held] or items
    adapter_path = Path(adapter) if adapter else None
    if adapter_path and not adapter_path.is_file():
        raise UserError(f"--adapter: file not found: {adapter_path}")
    runtime = Runtime(r)
    student = runtime.load_gguf_adapter(adapter_path) if adapter_path else runtime.student
    rep = Reporter(None, err_console, quiet=as_json)
    with runtime.sampler(adapter_path) as sampler, rep.phase("eval", len(items)) as advance:
        result = evaluate(items, sampler, student, runtime.tokenizer, max_tokens=r.eval.max_tokens,
                          on_prompt=lambda p: advance())
    result["prompts"] = str(path)
    result["adapter"] = str(adapter_path) if adapter_path else None
    base = _read_result(before) if before else None
    if base is not None:
        result["retention"] = retention(base, result)
    _open_ended(r, runtime, items, result, base, rep)
    if out:
        write_json(Path(out), result)
    if as_json:
        click.echo(dumps({k: v for k, v in result.items() if k != "replies"}))
        return
    console = Console()
    for key in ("n", "strict_accuracy", "lenient_accuracy", "anchor_score"):
        if key in result:
            console.print(f"{key:<17} {result[key]}")
    for line in _open_ended_lines({}, result):
        console.print(line.strip(), highlight=False)
    kept = result.get("retention") or {}
    for split, f in (result.get("splits") or {}).items():
        extra = f"  retention {kept[split]['retention']}" if split in kept else ""
        console.print(f"{split:<17} n {f['n']}  strict {f.get('strict_accuracy')}  "
                      f"lenient {f.get('lenient_accuracy')}{extra}", highlight=False)


def _open_ended(r, runtime, items, result: dict, base: dict | None, rep):
    """Reference metrics and (eval.judge) the judged comparison into `result`, through the cache of the recipe's
    run directory: references and verdicts a `pudl run` stored are reused, new ones are stored there."""
    from pathlib import Path

    from pudl.cache import Cache
    from pudl.evaluate import evaluate, reference_metrics
    from pudl.loop import collect_references, judge_replies

    path = Path(r.run.out) / "cache.sqlite"
    judging = r.eval.judge != "none"
    if not (judging or (r.eval.references and path.exists())):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = Cache(path)
    try:
        refs = collect_references(r, cache, items, rep)
        metrics = reference_metrics(result, refs)
        if metrics:
            result["reference"] = metrics
        if judging:
            if base is None:  # the base student's replies, greedy as in `pudl run`
                with runtime.sampler(None) as sampler, rep.phase("eval before", len(items)) as advance:
                    base = evaluate(items, sampler, max_tokens=r.eval.max_tokens, on_prompt=lambda p: advance())
            result["judge"] = judge_replies(r, cache, items, result, base, refs, rep)
    finally:
        cache.close()


def _read_result(path: str) -> dict:
    """A result `pudl eval --out` wrote (one line naming the file when it is not one)."""
    from pathlib import Path

    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--before: cannot read {path} ({e})") from None
    if not isinstance(result, dict) or "replies" not in result:
        raise UserError(f"--before: {path} is not a result written by `pudl eval --out`")
    return result


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def doctor(as_json):
    """Check the machine: which BLAS MLX uses (and its measured speed), devices, the built-in model."""
    from pudl.hardware import blas_report

    report = blas_report(measure=True)
    try:
        from pudl.models import resolve_model_path

        report["builtin_model"] = str(resolve_model_path("smollm2-135m"))
    except UserError as e:
        report["builtin_model"] = f"missing: {e}"
    if as_json:
        click.echo(dumps(report))
        return
    console = Console()
    for key, value in report.items():
        console.print(f"[bold]{key:<20}[/] {value}", highlight=False)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@user_errors
def report(run_dir):
    """Write RUN_DIR/report.html again from the run's files (every `pudl run` writes it at the end).

    One self-contained page (opens offline): training curves per step, held-out accuracy before/after,
    self-ranking score distributions per round, the ranker's agreement with the verifier, the recipe.
    """
    from pathlib import Path

    from pudl.html_report import write_report

    click.echo(write_report(Path(run_dir)))


@main.command()
@click.argument("path", type=click.Path(dir_okay=False), default="recipe.toml")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="student.model: 'smollm2-135m', a local .gguf or Hugging Face directory, or a hub id.")
@click.option("--teacher", type=click.Choice(["openai", "llamacpp", "jsonl", "tasks"]), default="tasks",
              show_default=True, help="teacher.backend: where the anchors come from.")
@click.option("--teacher-path", type=click.Path(dir_okay=False),
              help="teacher.path: the teacher GGUF (llamacpp) or the anchors JSONL (jsonl).")
@click.option("--data", type=click.Path(dir_okay=False),
              help="data.prompts (JSONL). Default: the built-in task suite, written to data/ beside PATH.")
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
@user_errors
def init(path, model, teacher, teacher_path, data, force):
    """Write a starter recipe at PATH (default recipe.toml): every key under its help text.

    Keys you choose with the flags are set; the others are commented out at pudl's default. The file
    loads as is: `pudl run PATH`.
    """
    from pathlib import Path

    from pudl.init_recipe import write_starter

    for written in write_starter(Path(path), force=force, data=Path(data) if data else None, model=model,
                                 teacher=teacher, teacher_path=Path(teacher_path) if teacher_path else None):
        click.echo(f"wrote {written}")
    click.echo(f"next: pudl run {path}")


BENCHES = ("kernels", "sampling", "e2e", "train")


@main.command()
@click.argument("name", type=click.Choice(BENCHES))
@click.option("--json", "as_json", is_flag=True, help="End with one JSON object on the last line.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the JSON result to this file.")
@click.option("--tiny", is_flag=True, help="A seconds-long smoke size (what the test suite runs).")
@user_errors
def bench(name, as_json, out, tiny):
    """Run benchmark NAME: pudl side by side with its peers in one run, as ratios.

    Figures depend on the machine; compare ratios measured in the same run. Each also reports the measured
    sgemm GFLOP/s, the tokens/s that rate allows (the ceiling) and the fraction pudl reaches.

    \b
    kernels   fused log-prob kernel vs naive (a minute)
    sampling  K candidates/prompt: pudl batched vs llama-cpp-python vs mlx-lm batch_generate (~5 min)
    e2e       real `pudl run`s of a reduced demo: a round by phase, prompts x K doubled 3 times, cached
              rerun (~10 min on 2 cores; larger: python -m pudl.bench.e2e --prompts 8 --k 4)
    train     one LoRA-DPO epoch: pudl vs mlx-lm-lora vs TRL+PEFT (~10 min; peers need the bench extra)

    With --out F.json the plot goes to F.png. Details: docs/benchmarks.md.
    """
    import importlib
    from pathlib import Path

    from pudl.bench.common import complete

    module = importlib.import_module(f"pudl.bench.{name}")
    result = module.run(tiny=tiny)
    result["command"] = "pudl bench " + name + (" --tiny" if tiny else "")
    complete(name, module, result, out)  # end load average, ceiling fields; with --out also F.png
    if out:
        Path(out).write_text(dumps(result, indent=2) + "\n")
    for line in module.lines(result):
        click.echo(line, err=as_json)
    if as_json:
        click.echo(dumps(result))


@main.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--to", "fmt", required=True, metavar="mlx|peft|gguf-lora|gguf-fused",
              help="mlx: mlx-lm adapter dir; peft: PEFT LoRA dir; gguf-lora: llama.cpp LoRA; gguf-fused: one GGUF "
                   "with the adapter merged (for Ollama / llama.cpp without --lora).")
@click.option("--out", required=True, type=click.Path(), help="File (gguf-*) or directory (mlx, peft) to write.")
@click.option("--quant", default="q8_0", show_default=True, metavar="q8_0|q4_0|f16|f32",
              help="gguf-fused: weight type of the merged GGUF.")
@click.option("--base", help="The run's student (.gguf or built-in name); default: from the run's recipe.")
@click.option("--hf-base", type=click.Path(file_okay=False),
              help="mlx, peft: the Hugging Face base directory the adapter is for (written from the GGUF if "
                   "missing); recorded in adapter_config.json.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@user_errors
def export(run_dir, fmt, out, quant, base, hf_base, force):
    """Export RUN_DIR's final adapter for other tools (see docs/export.md).

    The adapter is the last round's; every format computes W + (alpha/r)·B·A on the same base weights.
    """
    from pudl.export import export_run

    info = export_run(run_dir, fmt, out, base=base, quant=quant, hf_base=hf_base, force=force)
    click.echo(f"wrote {info['format']} to {info['out']} (rank {info['rank']}, alpha {info['alpha']:g}, "
               f"targets {','.join(info['targets'])}; from {info['adapter']})")
    if fmt == "gguf-fused":
        click.echo(f"Ollama Modelfile line: FROM {info['out']}")
    elif info.get("hf_base") and info["hf_base"] == info["base"]:
        click.echo("note: pass --hf-base DIR to write the Hugging Face base this adapter loads on")


main.add_command(cache)  # `pudl cache ...` (pudl/cache_cli.py)


def entry():
    """Console-script entry: fix BLAS first (may re-exec), then run the click group."""
    from pudl.hardware import ensure_fast_blas

    # Over a file-size limit (ulimit -f) a write fails with EFBIG, reported like a full disk, instead of the
    # signal killing the process mid-write.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    ensure_fast_blas()
    main()


if __name__ == "__main__":
    entry()
