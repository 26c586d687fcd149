"""The ``clsim`` command: parse arguments, call library functions, report errors plainly.

Every error a user can cause prints one paragraph (``clsim: error: ...``) and exits
non-zero; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from importlib import resources
from pathlib import Path

import clsim
from clsim.bounds import SEED_MAX, THREADS_MAX, WORKERS_MAX
from clsim.errors import ClsimError, ConfigError
from clsim.interrupts import is_contained, stop_tracking, track_user_interrupts

EPILOG = """examples:
  clsim run quickstart                    run a bundled scenario (see 'clsim list')
  clsim run my.yaml --out runs/a --seed 3 run a scenario file
  clsim validate my.yaml                  check a scenario without training
  clsim compare budget_sweep_quick --workers 2   strategies x budgets x seeds, with a report
  clsim run my.yaml --out runs/a --checkpoint-every experience
  clsim run my.yaml --out runs/a --resume        continue a stopped run
  clsim compare my.yaml --out runs/s --resume    continue a stopped comparison
  clsim new-plugin my_strategy            start a plugin package from a template
  clsim reproduce smnist_gdumb            a published configuration against its number
"""


def bundled_scenarios() -> dict[str, Path]:
    """Scenario name -> file, for the YAMLs shipped in ``scenarios/``."""
    try:
        root = resources.files("clsim_scenarios")
    except ModuleNotFoundError:
        return {}
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def scenario_path(arg: str) -> Path:
    """A file path, or the name of a bundled scenario."""
    path = Path(arg)
    if path.exists() or path.suffix in (".yaml", ".yml") or "/" in arg:
        return path
    bundled = bundled_scenarios()
    if arg in bundled:
        return bundled[arg]
    from clsim.validation import closest

    hint = closest(arg, bundled)
    raise ConfigError(
        f"no scenario file {arg!r}, and no bundled scenario of that name"
        + (f"; did you mean {hint!r}?" if hint else "")
        + (f" (bundled: {len(bundled)} scenarios, listed by 'clsim list')" if bundled
           else " (bundled: none)")
    )


def _load(arg: str):
    from clsim.config import load_scenario

    return load_scenario(scenario_path(arg))


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from clsim.assembly import default_out_dir
    from clsim.logging.console import (
        compute_budget_note,
        family_table,
        feature_cache_note,
        results_table,
    )
    from clsim.runner import run_scenario

    if args.resume and not args.out:
        raise ConfigError("--resume needs --out: the folder of the run to continue")
    scenario = _load(args.scenario)
    if args.device:
        scenario.device = args.device
    out = Path(args.out) if args.out else default_out_dir(scenario)
    print(
        f"clsim: {'resuming' if args.resume else 'running'} {scenario.name!r} "
        f"({len(args.strategy or scenario.strategies)} strategies) -> {out}",
        file=sys.stderr,
    )
    result = run_scenario(
        scenario, out, seed=args.seed, only=args.strategy, progress=not args.no_progress,
        limit=args.limit, checkpoint_every=args.checkpoint_every, resume=args.resume,
        debug=args.debug,
    )
    figure = "run.png, " if (out / "run.png").exists() else ""  # none if no strategy ran
    print(results_table(result.summary["strategies"]))
    family = family_table(result.summary)
    if family:
        print("\n" + family)
    for note in (compute_budget_note, feature_cache_note):
        text = note(result.summary["strategies"])
        if text:
            print("\n" + text)
    print(
        f"\nresults: {out}/summary.json, {figure}events.jsonl, tensorboard/ "
        f"(tensorboard --logdir {out}/tensorboard)"
    )
    if result.failed:
        names = ", ".join(o.name for o in result.failed)
        traced = any("traceback" in result.summary["strategies"][o.name] for o in result.failed)
        more = " (its 'error', and the 'traceback' that --debug prints)" if traced else ""
        print(f"clsim: error: strategy {names} failed; see summary.json{more}", file=sys.stderr)
        return 1
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from clsim.compare import compare_summary, run_compare

    path = scenario_path(args.scenario)
    out = (
        Path(args.out)
        if args.out
        else Path("runs") / (f"{path.stem}-compare-{time.strftime('%Y%m%d-%H%M%S')}")
    )
    print(f"clsim: comparing {path} -> {out}", file=sys.stderr)
    result = run_compare(
        path,
        out,
        executor=args.executor,
        workers=args.workers,
        address=args.address,
        resume=args.resume,
        retry_failed=args.retry_failed,
        threads=args.threads,
        progress=not args.no_progress,
    )
    print(compare_summary(result))
    if result.failed and args.debug:  # a failed cell's traceback, as clsim run --debug
        for record in result.failed:
            if record.get("traceback"):
                print(f"cell {record.get('cell')}:\n{record['traceback']}", file=sys.stderr)
    if result.failed:
        print(
            f"clsim: error: {len(result.failed)} cell(s) failed; see {out}/report.md",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from clsim.compare import rebuild_report, report_files

    analysis = rebuild_report(Path(args.dir))
    print(f"rebuilt {args.dir}/{report_files(analysis)} from {len(analysis.records)} cells")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    import torch

    from clsim.reproduce import default_registry, load_targets, markdown_table, run_targets, select

    registry = Path(args.targets) if args.targets else default_registry()
    chosen = select(load_targets(registry), args.names)
    if args.list:
        for t in chosen:
            spec = t.spec
            took = f", ~{spec.minutes:g} min" if spec.minutes else ""
            print(f"  {t.name:24s} {spec.strategy} on {spec.scenario}: published "
                  f"{spec.published:g} ({spec.device}{took}{', in CI' if spec.ci else ''})")
        return 0
    out = Path(args.out) if args.out else \
        Path("runs") / f"reproduce-{time.strftime('%Y%m%d-%H%M%S')}"
    outcomes, skipped = run_targets(
        chosen, out, named=bool(args.names), limit=args.limit, progress=not args.no_progress,
        cuda=torch.cuda.is_available(), say=lambda line: print(f"clsim: {line}", file=sys.stderr))
    print(markdown_table(outcomes, skipped), end="")
    print(f"\nresults: {out / 'reproduce.md'}, {out / 'reproduce.json'}")
    failed = [o.target.name for o in outcomes if o.verdict == "failed"]
    unexpected = [o.target.name for o in outcomes if not o.as_expected and o.verdict != "failed"]
    if failed:
        print(f"clsim: error: {', '.join(failed)} failed to run (see the table's notes)",
              file=sys.stderr)
    if unexpected:
        print(f"clsim: error: {', '.join(unexpected)}: the verdict is not the one expected",
              file=sys.stderr)
    return 1 if failed or unexpected else 0


def cmd_validate(args: argparse.Namespace) -> int:
    from clsim.assembly import build_scenario_model, build_stream, load_scenario_data

    scenario = _load(args.scenario)
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, scenario.seed)
    build_scenario_model(scenario, dataset, stream)
    for strategy in scenario.strategies.values():
        _strategy_hooks(strategy)  # plugins created and their composition checked
    timing = (f"online, evaluated every {stream.eval_every} samples"
              if stream.online else "offline")
    hidden = ", boundaries hidden" if stream.boundaries_hidden else ""
    print(
        f"{scenario.source}: ok — dataset {dataset.name} ({dataset.n_classes} classes, "
        f"{dataset.sample_bytes} bytes per sample), {scenario.stream.type} stream "
        f"({timing}{hidden}) of {len(stream)} experiences and "
        f"{sum(e.n_train for e in stream)} training samples, strategies: "
        f"{', '.join(scenario.strategies)}"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from clsim.data import dataset_names
    from clsim.models import MODELS
    from clsim.plugin_manager import (
        clash_message,
        load_plugin_class,
        options_class,
        registered_plugins,
    )
    from clsim.streams import STREAM_TYPES
    from clsim.validation import document

    if args.order:
        return _print_order(args)
    print("plugins (entry-point group 'clsim.plugins'):")
    for name, registrations in registered_plugins().items():
        if len(registrations) > 1:  # refused in a scenario: say so, and by whom
            print(f"  {name:<16} CLASH: {clash_message(name, registrations)}")
            continue
        ep = registrations[0]
        dist = ep.dist.name if ep.dist else "?"
        try:
            cls = load_plugin_class(name)
        except ClsimError as exc:
            print(f"  {name:<16} BROKEN: {exc}")
            continue
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"  {name:<16} {summary}  [{ep.value}, from {dist}]")
        declared = options_class(cls)
        for row in document(declared) if declared else []:
            print(
                f"      {row.name}: {row.accepts}; default {row.default}"
                + (f" — {row.help}" if row.help else "")
            )
    print("\nmodels:")
    for name, spec in MODELS.items():
        opts = ", ".join(f"{r.name}={r.default}" for r in document(spec.options))
        print(f"  {name:<16} {opts}")
    print("\nstream types (stream: {type: NAME, ...}):")
    for name, kind in STREAM_TYPES.items():
        print(f"  {name:<18} {kind.help}")
        for row in document(kind.options):
            print(f"      {row.name}: {row.accepts}; default {row.default}"
                  + (f" — {row.help}" if row.help else ""))
    print("\ndatasets: " + ", ".join(dataset_names()))
    print("\nbundled scenarios (clsim run NAME):")
    for name, path in sorted(bundled_scenarios().items()):
        print(f"  {name:<24} {_first_comment(path)}")
    return 0


def _first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""




def _strategy_hooks(strategy):
    """The strategy's plugins created and registered as a run does it, so a strategy
    whose plugins cannot run together is refused here too, naming the strategy."""
    from clsim.errors import PluginError
    from clsim.plugin_manager import HookRunner, build_plugin_manager, create_plugin

    try:
        plugins = [(p.name, create_plugin(p)) for p in strategy.plugins]
        return HookRunner(build_plugin_manager(plugins))
    except PluginError as exc:
        raise PluginError(f"strategy {strategy.name!r}: {exc}") from None


def _training_line(hooks) -> str:
    """Who trains the strategy's experiences: the standard loop, or the one owner."""
    owners = hooks.order("clsim_train_experience")
    if not owners:
        return "experiences: the standard loop trains them"
    return (f"experiences: {owners[0]!r} owns those it learns itself "
            "(clsim_train_experience); the standard loop trains the others")


def _print_order(args: argparse.Namespace) -> int:
    from clsim.hookspecs import RUN_ORDER
    from clsim.plugin_manager import HOOK_NAMES

    if args.order != "all" and args.order not in HOOK_NAMES:
        raise ConfigError(f"--order: unknown hook {args.order!r} (hooks: "
                          f"{', '.join(RUN_ORDER)}; or 'all')")
    if not args.scenario:
        raise ConfigError("--order needs a scenario: clsim list --order HOOK SCENARIO")
    scenario = _load(args.scenario)
    refused: list[ClsimError] = []
    for strategy in scenario.strategies.values():
        try:
            hooks = _strategy_hooks(strategy)
        except ClsimError as exc:
            print(f"{strategy.name}: refused at start-up")
            refused.append(exc)
            continue
        if args.order == "all":
            print(f"{strategy.name}:  ({_training_line(hooks)})")
            for hook in RUN_ORDER:
                if hooks.order(hook):
                    print(f"  {hook:<24} {' -> '.join(hooks.order(hook))}")
            continue
        order = hooks.order(args.order)
        print(f"{strategy.name}: {' -> '.join(order) or '(no plugin implements it)'}  "
              f"({_training_line(hooks)})")
    if refused:
        for exc in refused[1:]:
            print(f"clsim: error: {exc}", file=sys.stderr)
        raise refused[0]
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from clsim.scaffold import write_plugin_package

    target = write_plugin_package(args.name, Path(args.dir))
    print(f"wrote {target}/ — next: pip install -e {target} && clsim list")
    return 0


# ---------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------


DEBUG_HELP = ("show tracebacks on errors, and a failed strategy's plugin traceback "
              "(accepted before or after the command)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: one paragraph, exit 2
        self.print_usage(sys.stderr)
        print(f"clsim: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="clsim",
        description="Continual-learning simulator: run strategies "
        "on task streams and score them against measured memory budgets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"clsim {clsim.__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # every command takes --debug after it too (parents=[common]); SUPPRESS keeps a
    # command without it from resetting the value given before the command
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=DEBUG_HELP)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    run = sub.add_parser("run", parents=[common],
                         help="run every strategy of a scenario and write results")
    run.add_argument("scenario", help="a scenario YAML file, or a bundled scenario name")
    run.add_argument(
        "--out", help="results folder (default: runs/NAME-TIMESTAMP); must not already hold results"
    )
    run.add_argument("--seed", type=_seed, help="override the scenario's seed")
    run.add_argument(
        "--strategy", action="append", metavar="NAME", help="run only this strategy (repeatable)"
    )
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override 'device'")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--limit", type=_positive_int, metavar="N",
        help="smoke test: keep the first N training and N test samples of every experience",
    )
    run.add_argument(
        "--checkpoint-every", choices=["experience"],
        help="save the strategy in flight after every experience, so --resume can continue it",
    )
    run.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out after an interruption (same scenario, seed, limit)",
    )
    run.set_defaults(func=cmd_run)

    compare = sub.add_parser(
        "compare", parents=[common],
        help="run the scenario's grid of strategies x budgets x seeds and write a report"
    )
    compare.add_argument(
        "scenario", help="a scenario YAML file with a 'compare' section, or a bundled scenario name"
    )
    compare.add_argument("--out", help="results folder (default: runs/NAME-compare-TIMESTAMP)")
    compare.add_argument(
        "--executor",
        choices=["inline", "local", "ray"],
        default="local",
        help="inline: this process; local: a process pool (default); ray: a Ray cluster",
    )
    compare.add_argument(
        "--workers", type=_workers, default=1,
        help=f"cells run at once (default: 1; at most {WORKERS_MAX}: each is a process "
        "with torch loaded, a few hundred MB, so more is a slip)",
    )
    compare.add_argument("--address", help="Ray cluster address (default: start a local one)")
    compare.add_argument(
        "--threads", type=_threads,
        help=f"torch threads per cell (default: cores // workers; at most {THREADS_MAX}, "
        "as the scenario key 'threads')",
    )
    compare.add_argument(
        "--resume",
        action="store_true",
        help="continue a comparison in --out, skipping finished cells",
    )
    compare.add_argument(
        "--retry-failed", action="store_true", help="with --resume, also rerun cells that failed"
    )
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")
    compare.set_defaults(func=cmd_compare)

    report = sub.add_parser("report", parents=[common],
                            help="rebuild a comparison's report from cells.jsonl")
    report.add_argument("dir", metavar="DIR", help="the comparison's results folder")
    report.set_defaults(func=cmd_report)

    reproduce = sub.add_parser(
        "reproduce", parents=[common],
        help="run published configurations and compare with their published numbers")
    reproduce.add_argument("names", nargs="*", metavar="NAME",
                           help="targets to run (default: every CPU target of the registry)")
    reproduce.add_argument("--targets", metavar="FILE",
                           help="registry of targets (default: the bundled "
                           "scenarios/reproduce/targets.yaml)")
    reproduce.add_argument("--out", help="results folder (default: runs/reproduce-TIMESTAMP)")
    reproduce.add_argument(
        "--limit", type=_positive_int, metavar="N",
        help="smoke test: the first N training and test samples of every experience (no "
        "verdict); runs GPU targets too")
    reproduce.add_argument("--list", action="store_true", help="list the targets and stop")
    reproduce.add_argument("--no-progress", action="store_true", help="no progress bars")
    reproduce.set_defaults(func=cmd_reproduce)

    validate = sub.add_parser(
        "validate", parents=[common],
        help="check a scenario (config, data files, plugins and their hooks, stream) without "
        "training"
    )
    validate.add_argument("scenario", help="a scenario YAML file, or a bundled scenario name")
    validate.set_defaults(func=cmd_validate)

    listing = sub.add_parser(
        "list", parents=[common],
        help="registered plugins with their options, models, datasets and bundled scenarios"
    )
    listing.add_argument(
        "--order", metavar="HOOK",
        help="print the call order of HOOK (or of every hook: 'all') for each strategy of "
        "SCENARIO, and who trains its experiences",
    )
    listing.add_argument("scenario", nargs="?", help="scenario for --order")
    listing.set_defaults(func=cmd_list)

    new = sub.add_parser("new-plugin", parents=[common],
                         help="write a small installable plugin package to edit")
    new.add_argument("name", help="plugin name: a Python identifier, e.g. my_strategy")
    new.add_argument("--dir", default=".", help="folder to write the package into (default: .)")
    new.set_defaults(func=cmd_new_plugin)
    return parser


def _int_between(low: int, high: int, words: str, bound: str = ""):
    """An argparse type: an integer in [low, high], with a message in ``words`` (and
    ``bound`` after the value given)."""

    def parse(text: str) -> int:
        try:
            value = int(text) if len(text) <= 40 else None
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise argparse.ArgumentTypeError(f"expected {words}; got {shown!r}{bound}")
        return value

    return parse


# the bounds the scenario file's keys have (config.py), so a flag accepts what YAML does
_positive_int = _int_between(1, SEED_MAX, "a positive integer")
_seed = _int_between(0, SEED_MAX, f"a seed: an integer from 0 to 2**63 - 1 ({SEED_MAX})")
_threads = _int_between(1, THREADS_MAX, "a positive integer", f" (at most {THREADS_MAX})")
_workers = _int_between(1, WORKERS_MAX, "a positive integer", f" (at most {WORKERS_MAX})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    track_user_interrupts()  # the user's Ctrl-C stops clsim; a plugin's KeyboardInterrupt not
    try:
        from clsim.feature_cache import max_bytes_from_env

        max_bytes_from_env()  # a bad CLSIM_FEATURE_CACHE is refused before anything is written
        if args.func in (cmd_run, cmd_compare, cmd_reproduce):
            from clsim.compute import mode_from_env

            mode_from_env()  # a bad CLSIM_COMPUTE stops here, before any strategy runs
        return args.func(args)
    except ClsimError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"clsim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BaseException as exc:  # whatever escaped: one paragraph, never a traceback
        if not is_contained(exc):
            print(INTERRUPTED, file=sys.stderr)
            return 130
        if args.debug:
            traceback.print_exc()
        from clsim.text import describe_fault

        print(f"clsim: internal error: {describe_fault(exc)}. This is a bug in clsim or in a "
              "plugin; rerun with --debug for the traceback and report it.", file=sys.stderr)
        return 70
    finally:
        stop_tracking()


INTERRUPTED = ("clsim: interrupted; results written so far are kept (clsim run and clsim "
               "compare continue with the same command, --out FOLDER and --resume)")


if __name__ == "__main__":
    sys.exit(main())
