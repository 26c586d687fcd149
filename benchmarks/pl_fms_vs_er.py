"""PL-FMS against plain ER at every hierarchy level of an HLE scenario, over seeds.

Runs every strategy of the scenario (default ``scenarios/pl_fms_omniglot.yaml``: ER with
a reservoir memory, ER with a class-balanced memory and PL-FMS, all under the same
budget) for each seed, each strategy on the same stream, and prints per level A_auc and
A_last as mean +- sample standard deviation over the seeds, then, for PL-FMS against each
baseline, the per-level difference of the means and the number of seeds it wins (paired:
same seed, same stream). ``--ablations`` adds PL-FMS with one part switched off at a time
(importance-based eviction, flexible sampling, pseudo-labels), and with all three off;
``--variant NAME KEY=VALUE ...`` adds PL-FMS with other options (a sensitivity check).
``--limit N`` keeps the first N training and test samples of every experience (a shorter
stream, decided before running, never per strategy). Runs use one torch thread (the
scenario's ``threads``).

    CLSIM_DATA=/path/to/data python benchmarks/pl_fms_vs_er.py [--seeds 0 1 2]
        [--scenario scenarios/pl_fms_omniglot.yaml] [--ablations] [--limit N] [--json F]
        [--variant NAME KEY=VALUE ...] [--only STRATEGY ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from clsim.config import parse_scenario
from clsim.runner import run_scenario

REPO_ROOT = Path(__file__).resolve().parents[1]
METHOD = "pl_fms"
ABLATIONS = {  # PL-FMS with one part off
    "pl_fms-no_importance": {"importance": False},
    "pl_fms-no_fms": {"flexible_sampling": False},
    "pl_fms-no_pseudo": {"pseudo_labels": False},
    # all three off: ER with a class-balanced memory (random eviction from the largest
    # class), updated before the batch is formed, as this plugin does
    "pl_fms-all_off": {"importance": False, "flexible_sampling": False, "pseudo_labels": False},
}


def load(path: Path, ablations: bool, variants: list[list[str]]):
    """The scenario, with the ablation strategies and the asked-for variants added."""
    data = yaml.safe_load(path.read_text())
    added = dict(ABLATIONS) if ablations else {}
    for name, *settings in variants:
        added[name] = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in settings)}
    budget = data["strategies"][METHOD].get("budget")
    for name, options in added.items():
        data["strategies"][name] = {"plugins": [{METHOD: dict(options)}],
                                    **({"budget": budget} if budget else {})}
    return parse_scenario(yaml.safe_dump(data, sort_keys=False), source=str(path),
                          base_dir=str(path.parent), default_name=path.stem)


def mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} +- {std:.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", type=Path, default=REPO_ROOT / "scenarios" /
                        "pl_fms_omniglot.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--variant", nargs="+", action="append", default=[],
                        metavar="NAME [KEY=VALUE ...]",
                        help="add PL-FMS with these options as strategy NAME")
    parser.add_argument("--only", nargs="+", help="strategies to run (default: all)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every score here")
    args = parser.parse_args()

    torch.set_num_threads(1)  # a shared machine; the scenario's threads say the same
    scenario = load(args.scenario, args.ablations, args.variant)
    names = args.only or list(scenario.strategies)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    levels: list[str] = []
    started = time.perf_counter()
    for seed in args.seeds:
        summary = run_scenario(scenario, None, seed=seed, only=names, limit=args.limit).summary
        levels = [lv["name"] for lv in summary["stream"]["label_levels"]]
        sizes = {lv["name"]: lv["n_classes"] for lv in summary["stream"]["label_levels"]}
        for name in names:
            outcome = summary["strategies"][name]
            if outcome["status"] != "ok":
                print(f"{name} failed on seed {seed}: {outcome['error']}", file=sys.stderr)
                return 1
            runs[name].append({
                "seed": seed,
                "anytime": {g: {k: outcome["anytime"][g][k] for k in ("a_auc", "a_last")}
                            for g in ["all", *levels]},
                "peak_bytes": outcome["peak_bytes"],
                "budget_bytes": outcome["budget_bytes"],
                "over_budget": outcome["over_budget"],
                "wall_seconds": outcome["wall_seconds"],
                "report": outcome.get("plugins", {}).get(METHOD),
            })
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    print(f"scenario {scenario.name} ({args.scenario.name}), seeds {args.seeds}"
          + (f", first {args.limit} samples per experience" if args.limit else ""))
    print("chance per level: " + ", ".join(f"{lv} {1 / sizes[lv]:.4f}" for lv in levels))
    print()
    groups = [*levels, "all"]
    header = ["strategy"] + [f"{g} {m}" for g in groups for m in ("A_auc", "A_last")]
    rows = []
    for name in names:
        cells = [name]
        for group in groups:
            for metric in ("a_auc", "a_last"):
                cells.append(mean_std([r["anytime"][group][metric] for r in runs[name]]))
        rows.append(cells)
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print()
    print("memory held (peak, bytes) / budget, wall seconds per run (mean):")
    for name in names:
        r = runs[name]
        print(f"  {name}: {max(x['peak_bytes'] for x in r)} / {r[0]['budget_bytes']}"
              f"{' OVER BUDGET' if any(x['over_budget'] for x in r) else ''}, "
              f"{statistics.fmean(x['wall_seconds'] for x in r):.1f} s")
    methods = [n for n in names if n.startswith(METHOD)]
    baselines = [n for n in names if not n.startswith(METHOD)]
    for method in methods:
        for base in baselines:
            print()
            print(f"{method} vs {base}: mean difference (seeds won)")
            for group in groups:
                parts = []
                for metric, label in (("a_auc", "A_auc"), ("a_last", "A_last")):
                    ours = [r["anytime"][group][metric] for r in runs[method]]
                    theirs = [r["anytime"][group][metric] for r in runs[base]]
                    won = sum(a > b for a, b in zip(ours, theirs, strict=True))
                    diff = statistics.fmean(ours) - statistics.fmean(theirs)
                    parts.append(f"{label} {diff:+.4f} ({won}/{len(ours)})")
                print(f"  {group:<12} " + "   ".join(parts))
    for method in methods:
        report = runs[method][0]["report"]
        if report:
            print()
            print(f"{method} memory at the end, seed {args.seeds[0]}: {json.dumps(report)}")
    print()
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
