"""Reproduction targets: published numbers, the scenario that is each one's configuration,
and whether clsim reproduces them.

A registry (``scenarios/reproduce/targets.yaml``) lists every target: the scenario file
that is the published configuration, the strategy of it whose score is compared, the
published number, where it comes from, a tolerance and the seeds. ``clsim reproduce``
runs them and writes a Markdown table of measured against published, with the verdict.

The verdict follows continual-learning-baselines' rule: a target is reproduced when the
mean over its seeds is at least the published number less the tolerance (a higher score
passes). A target may be registered as expected not to reproduce, with the reason; the
table says so, and only a verdict that differs from the expectation is a failure.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from clsim.config import load_scenario
from clsim.errors import ClsimError, ConfigError, OptionError
from clsim.results import write_text_atomic
from clsim.validation import Source, build, closest, load_yaml

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"


@dataclass
class TargetSpec:
    """One published number and the configuration that should give it (YAML fields)."""

    scenario: str = field(metadata={"help": "the scenario file (relative to the registry)"})
    strategy: str = field(metadata={"help": "the scenario's strategy whose score is compared"})
    published: float = field(metadata={"min": 0.0, "max": 1.0,
                                       "help": "the published number, as a fraction"})
    source: str = field(metadata={"help": "where the number is published: repository file "
                                  "at a commit, or paper and table"})
    tolerance: float = field(default=0.03, metadata={
        "min": 0.0, "max": 1.0, "help": "how far below the published number still counts"})
    metric: Literal["final_accuracy", "average_incremental_accuracy"] = field(
        default="final_accuracy", metadata={"help": "the summary score compared"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={
        "min": 0, "min_items": 1, "max_items": 100, "help": "seeds run; their mean is compared"})
    paper: str | None = field(default=None, metadata={
        "help": "the paper's own number and where, when the target is a reimplementation's"})
    device: Literal["cpu", "gpu"] = field(default="cpu", metadata={
        "help": "gpu: too slow on a CPU to run by default (a --limit smoke test runs it)"})
    minutes: float | None = field(default=None, metadata={
        "min": 0.0, "help": "wall time of a run measured here (all seeds)"})
    ci: bool = field(default=False, metadata={
        "help": "run in the test suite (under a minute), pinned to the value measured here"})
    pinned: float | None = field(default=None, metadata={
        "min": 0.0, "max": 1.0, "help": "the score measured here at the first seed"})
    expected: Literal["reproduced", "not reproduced"] = field(default=REPRODUCED, metadata={
        "help": "the verdict expected here; 'not reproduced' needs a note saying why"})
    note: str = field(default="", metadata={"help": "what differs from the publication"})

    def check(self) -> None:
        if self.expected == NOT_REPRODUCED and not self.note.strip():
            raise OptionError("note", "a target expected not to reproduce needs a note "
                              "saying why")
        if self.ci and self.pinned is None:
            raise OptionError("pinned", "a CI target needs 'pinned': the score measured here")


@dataclass(frozen=True)
class Target:
    """A registered target with its scenario file resolved."""

    name: str
    spec: TargetSpec
    scenario_path: Path


@dataclass
class Outcome:
    """What a run of one target measured, and the verdict."""

    target: Target
    scores: list[float | None]
    minutes: float
    limit: int | None = None
    error: str | None = None

    @property
    def measured(self) -> float | None:
        values = [s for s in self.scores if s is not None]
        return None if not values or len(values) < len(self.scores) else sum(values) / len(values)

    @property
    def verdict(self) -> str:
        """reproduced, not reproduced, failed, or a smoke test (no verdict)."""
        if self.error is not None or self.measured is None:
            return "failed"
        if self.limit is not None:
            return f"smoke test (--limit {self.limit}): no verdict"
        spec = self.target.spec
        return REPRODUCED if self.measured >= spec.published - spec.tolerance - 1e-12 \
            else NOT_REPRODUCED

    @property
    def as_expected(self) -> bool:
        """True when nothing is wrong: the expected verdict, or a smoke test that ran."""
        if self.verdict == "failed":
            return False
        return self.limit is not None or self.verdict == self.target.spec.expected


def default_registry() -> Path:
    """The registry shipped with the bundled scenarios."""
    return Path(str(resources.files("clsim_scenarios") / "reproduce" / "targets.yaml"))


def load_targets(path: str | Path) -> dict[str, Target]:
    """Every target of the registry at ``path``, each checked: its fields, its scenario
    file (validated) and that the scenario has the strategy named. Errors are
    ConfigErrors naming the registry file, the line and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("registry of reproduction targets not found (give one with "
                          "--targets FILE)", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the registry: {exc}", source=str(path)) from None
    data, lines = load_yaml(text, str(path))
    src = Source(str(path), lines)
    if not isinstance(data, dict) or set(data) != {"targets"} or not isinstance(
            data["targets"], dict) or not data["targets"]:
        raise src.error((), "expected a mapping with one key, 'targets': target name -> "
                        "{scenario, strategy, published, source, ...}")
    targets = {}
    for name, raw in data["targets"].items():
        where = ("targets", str(name))
        spec = build(TargetSpec, raw, where, src)
        scenario_path = (path.parent / spec.scenario).resolve()
        try:
            scenario = load_scenario(scenario_path)
        except ConfigError as exc:
            raise src.error(where + ("scenario",), f"its scenario does not load: {exc}") \
                from None
        if spec.strategy not in scenario.strategies:
            hint = closest(spec.strategy, scenario.strategies)
            raise src.error(where + ("strategy",), f"no strategy {spec.strategy!r} in "
                            f"{spec.scenario} (it has: {', '.join(scenario.strategies)})"
                            + (f"; did you mean {hint!r}?" if hint else ""))
        targets[str(name)] = Target(str(name), spec, scenario_path)
    return targets


def select(targets: dict[str, Target], names: list[str]) -> list[Target]:
    """The targets named (all when none is), unknown names refused with the closest."""
    for name in names:
        if name not in targets:
            hint = closest(name, targets)
            raise ConfigError(f"no reproduction target {name!r}"
                              + (f"; did you mean {hint!r}?" if hint else "")
                              + f" (targets: {', '.join(targets)})")
    return [targets[n] for n in names] if names else list(targets.values())


def run_target(target: Target, out_dir: Path, *, limit: int | None = None,
               progress: bool = False) -> Outcome:
    """Run ``target``'s strategy at each of its seeds into ``out_dir/seed-S``; a run that
    cannot start (missing data, too little memory) is a failed outcome naming why."""
    from clsim.runner import run_scenario

    spec = target.spec
    started = time.perf_counter()
    scores: list[float | None] = []
    error = None
    for seed in spec.seeds:
        try:
            result = run_scenario(load_scenario(target.scenario_path), out_dir / f"seed-{seed}",
                                  seed=seed, only=[spec.strategy], progress=progress,
                                  limit=limit)
        except ClsimError as exc:
            scores.append(None)
            error = str(exc)
            break
        summary = result.summary["strategies"][spec.strategy]
        value = summary.get(spec.metric)
        scores.append(None if value is None or not math.isfinite(value) else float(value))
        if summary.get("status") != "ok":
            error = summary.get("error", "the strategy failed")
    return Outcome(target, scores, (time.perf_counter() - started) / 60, limit, error)


def run_targets(chosen: list[Target], out_dir: Path, *, named: bool, limit: int | None,
                progress: bool, cuda: bool,
                say: Callable[[str], None] = lambda line: None) -> tuple[list[Outcome], dict]:
    """Run every chosen target that is not skipped into ``out_dir/NAME``, rewriting the
    report after each, so an interruption keeps what was measured. ``out_dir`` must not
    hold a report already (nothing measured before is overwritten)."""
    if (out_dir / "reproduce.json").exists():
        raise ConfigError(f"--out {out_dir} already holds a reproduce run (reproduce.json); "
                          "choose another folder")
    outcomes: list[Outcome] = []
    skipped: dict[str, str] = {}
    for target in chosen:
        why = skipped_reason(target, named=named, limit=limit, cuda=cuda)
        if why is not None:
            skipped[target.name] = why
            say(f"{target.name}: skipped, {why}")
            continue
        say(f"reproducing {target.name} ({target.spec.strategy}, seeds {target.spec.seeds}) "
            f"-> {out_dir / target.name}")
        outcomes.append(run_target(target, out_dir / target.name, limit=limit,
                                   progress=progress))
        write_report(out_dir, outcomes, skipped)
    write_report(out_dir, outcomes, skipped)
    return outcomes, skipped


def skipped_reason(target: Target, *, named: bool, limit: int | None, cuda: bool) -> str | None:
    """Why a target is not run now (a GPU target on a CPU, unless named or limited)."""
    if target.spec.device == "gpu" and not (named or limit is not None or cuda):
        return "marked gpu: run it by name, on a GPU, or with --limit N as a smoke test"
    return None


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def markdown_table(outcomes: list[Outcome], skipped: dict[str, str] | None = None) -> str:
    """Measured against published, one row per target, with the verdict and its reason."""
    header = ("| target | strategy | published (%) | tolerance | measured (%) | seeds | "
              "verdict | minutes | source | note |")
    rows = [header, "|" + "---|" * 10]
    for o in outcomes:
        spec = o.target.spec
        measured = _percent(o.measured)
        if len(o.scores) > 1:
            measured += " (" + ", ".join(_percent(v) for v in o.scores) + ")"
        verdict = o.verdict
        if o.limit is None and verdict != "failed" and verdict != spec.expected:
            verdict += f" (expected: {spec.expected})"
        elif verdict == NOT_REPRODUCED:
            verdict += " (expected)"
        note = spec.note + (f" Paper: {spec.paper}." if spec.paper else "")
        if o.error:
            note = f"error: {o.error}. " + note
        rows.append(f"| {o.target.name} | {spec.strategy} | {_percent(spec.published)} | "
                    f"{100 * spec.tolerance:.0f} | {measured} | "
                    f"{', '.join(map(str, spec.seeds))} | {verdict} | {o.minutes:.1f} | "
                    f"{spec.source} | {_cell(note)} |")
    for name, why in (skipped or {}).items():
        rows.append(f"| {name} | | | | | | skipped: {why} | | | |")
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def outcome_record(o: Outcome) -> dict[str, Any]:
    """JSON-ready record of one outcome (reproduce.json)."""
    spec = o.target.spec
    return {"target": o.target.name, "strategy": spec.strategy, "metric": spec.metric,
            "published": spec.published, "tolerance": spec.tolerance, "seeds": spec.seeds,
            "scores": o.scores, "measured": o.measured, "verdict": o.verdict,
            "expected": spec.expected, "as_expected": o.as_expected, "limit": o.limit,
            "minutes": round(o.minutes, 3), "error": o.error, "source": spec.source,
            "scenario": str(o.target.scenario_path)}


def write_report(out_dir: Path, outcomes: list[Outcome], skipped: dict[str, str]) -> Path:
    """``reproduce.md`` (the table) and ``reproduce.json`` (the records) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "reproduce.json", json.dumps(
        {"targets": [outcome_record(o) for o in outcomes], "skipped": skipped}, indent=2) + "\n")
    table = out_dir / "reproduce.md"
    write_text_atomic(table, "# clsim reproduce\n\n" + markdown_table(outcomes, skipped))
    return table
