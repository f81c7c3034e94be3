"""Order consistency of every scorer on a run's cached round-1 candidates, as a markdown table.

    python studies/order_consistency.py RUN_DIR PROMPTS.jsonl

Only prompts that every scorer has scored are counted (a cache scored before a scorer existed gets it on the
next `pudl run`); writes RUN_DIR/order-consistency.json beside the table it prints.
"""

import json
import sys

from pudl.cache import Cache
from pudl.prompts import load_prompts
from pudl.recipe import SCORERS
from pudl.agreement import order_consistency


def fmt(x: float) -> str:
    return "—" if x != x else f"{x:.2f}"


def print_table(out: dict, label: str = "scorer"):
    """order_consistency's result (name -> figures) as a markdown table, per-family AUC / Spearman columns."""
    first = next(iter(out.values()))
    families = sorted(first["by_family"])
    print(f"{first['candidates']} candidates: {fmt(first['correct_fraction'])} lenient-correct, "
          f"{fmt(first['strict_fraction'])} strict-correct, {first['mixed_groups']} mixed groups")
    print(f"| {label} | AUC lenient | AUC strict | Spearman | Spearman within | best-vs-worst | "
          + " | ".join(f"{f}: AUC / ρ" for f in families) + " |")
    print("|" + " --- |" * (6 + len(families)))
    for name, r in out.items():
        fam = " | ".join(f"{fmt(r['by_family'][f]['auc'])} / {fmt(r['by_family'][f]['spearman'])}" for f in families)
        print(f"| `{name}` | {fmt(r['auc'])} | {fmt(r['auc_strict'])} | {fmt(r['spearman'])} | "
              f"{fmt(r['spearman_within'])} | {fmt(r['best_vs_worst_correct'])} | {fam} |")
    print("lenient-correct fraction per family:",
          {f: fmt(first["by_family"][f]["correct_fraction"]) for f in families})


def main(run_dir: str, prompts_file: str):
    cache = Cache(f"{run_dir}/cache.sqlite")
    scores = {s: cache.scores(1, s) for s in SCORERS}
    common = set.intersection(*(set(v) for v in scores.values()))
    prompts = [p for p in load_prompts(prompts_file) if p.id in common]
    out = order_consistency(prompts, cache.candidates(1),
                            {s: {k: v for k, v in scores[s].items() if k in common} for s in SCORERS})
    print(f"{len(prompts)} prompts")
    print_table(out)
    with open(f"{run_dir}/order-consistency.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
