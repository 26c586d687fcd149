"""Does ``clsim compare`` get faster with 2 workers? Inline vs process pool vs Ray.

The same comparison grid on split MNIST (naive and reservoir replay, 2 memory-aligned
budgets, 3 seeds: 12 cells of about 3 to 6 seconds each at 1 torch thread) runs as a
user runs it, ``clsim compare`` in a fresh process, each time into a fresh temporary
``--out``:

* 1 worker: ``--executor inline`` (the cells one after another in the CLI's process);
* 2 workers, ``--executor local``: a pool of 2 spawned worker processes;
* 2 workers, ``--executor ray``: a local Ray cluster started by the CLI;
* 1 worker using every core: ``--executor inline --threads <cores>``, the honest
  baseline, since a user with one worker would give it all the cores.

The wall time of each CLI process (start-up, data loading, cells, report) is compared
with the 1-worker run at the same thread count; target: >= 1.7x for 2 workers on a
2-core machine. Every cell's record (``cells.jsonl``: its own wall seconds and the
worker's pid) splits each wall time into the cells' fair share, the imbalance of the
busiest worker and the time outside any cell. The ``summary.csv`` files of the runs at
the same thread count must be identical (where a cell runs does not change its result).
The machine may be shared: before each run the script waits for it to be idle, counts the
CPU that other processes use during the run, and reruns a run they disturbed.

    CLSIM_DATA=/path/to/data python benchmarks/compare_scaling.py [--repeats 1] [--check]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

TARGET_SPEEDUP = 1.7  # 2-worker process pool over 1 worker, same threads per cell
BUSY_LOAD = 0.5  # a 1-minute load average above this at the start: the machine was busy
IDLE_BUSY = 0.10  # the machine counts as idle below this fraction of all cores busy
DISTURBED = 0.05  # other processes' CPU seconds above this fraction of a run's wall seconds

# the grid: short cells on real data, long enough that a worker's start-up (~3.5 s to
# import torch and clsim, ~2 s more in its first cell) is small against its share of the
# work (6 cells of 3-6 s, ~30 s); naive cells are shorter than replay ones, and the grid
# is planned strategy-major, so it also shows what uneven cells cost at its end
STRATEGIES = ("naive", "reservoir")
EXEMPLARS = (500, 2000)  # aligned budgets: the reference model's bytes plus N images


def scenario_yaml(seeds: list[int]) -> str:
    """The comparison, as a user would write it (split MNIST, as in budget_sweep_mnist)."""
    budgets = "\n".join(f"    - {{aligned: model + {n} exemplars}}" for n in EXEMPLARS)
    return f"""\
name: compare_scaling
seed: 0
data: {{dataset: mnist}}
stream: {{type: class_incremental, n_experiences: 5}}
model: {{name: mlp, hidden: [400, 400]}}
training:
  epochs: 1
  batch_size: 128
  optimizer: {{name: sgd, lr: 0.01}}
strategies:
  naive:
    plugins: [naive]
  reservoir:
    plugins: [replay]
compare:
  budgets:
{budgets}
  seeds: [{", ".join(map(str, seeds))}]
"""


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    executor: str
    workers: int
    threads: int


@dataclass
class Run:
    """One ``clsim compare`` process: its wall time, its cells, the machine around it."""

    seconds: float
    records: list[dict]
    summary: str  # summary.csv as written
    load_before: float
    load_after: float
    machine_cpu_seconds: float  # every process on the machine, from /proc/stat
    other_cpu_seconds: float  # processes outside this benchmark's tree, sampled
    busy_before: float = 0.0  # fraction of all cores busy in the 2 s before the run
    waited: float = 0.0  # seconds spent waiting for the machine to be idle

    def first_cell_extra(self) -> float | None:
        """How much longer each worker's first cell took than the median of the other cells
        of its strategy (the per-process warm-up: lazy imports, the dataset), on average."""
        by_strategy: dict[str, list[float]] = defaultdict(list)
        firsts: dict[int, dict] = {}
        for r in self.records:  # in the order they finished
            if r["pid"] in firsts:
                by_strategy[r["strategy"]].append(r["wall_seconds"])
            else:
                firsts[r["pid"]] = r
        extra = [r["wall_seconds"] - statistics.median(by_strategy[r["strategy"]])
                 for r in firsts.values() if by_strategy[r["strategy"]]]
        return statistics.mean(extra) if extra else None

    @property
    def own_cpu_seconds(self) -> float:
        return max(0.0, self.machine_cpu_seconds - self.other_cpu_seconds)

    @property
    def disturbed(self) -> bool:
        return self.other_cpu_seconds > DISTURBED * self.seconds

    @property
    def cell_seconds(self) -> float:
        return sum(r["wall_seconds"] for r in self.records)

    @property
    def per_worker(self) -> dict[int, float]:
        busy: dict[int, float] = defaultdict(float)
        for r in self.records:
            busy[r["pid"]] += r["wall_seconds"]
        return busy


@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=lambda: defaultdict(list))

    def median(self, key: str) -> float:
        return statistics.median(r.seconds for r in self.runs[key])

    def typical(self, key: str) -> Run:
        """The run whose wall time is nearest the median (the one to break down)."""
        wall = self.median(key)
        return min(self.runs[key], key=lambda r: abs(r.seconds - wall))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time `clsim compare` on one grid (split MNIST, 2 strategies x 2 budgets "
        "x N seeds) with 1 worker inline, 2 workers in a process pool and 2 workers on a "
        "local Ray cluster, each as a fresh CLI process into a fresh --out.",
    )
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of every configuration; the median counts (default: 1)")
    parser.add_argument("--seeds", type=int, default=6,
                        help="seeds 0..N-1; the grid has 4N cells (default: 6, 24 cells: "
                        "on fewer cells the fixed start-up costs dominate)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per cell in the 1- and 2-worker runs (default: 1; "
                        "the 'every core' baseline always uses all cores)")
    parser.add_argument("--skip-ray", action="store_true", help="leave out the Ray run")
    parser.add_argument("--data-root", default=os.environ.get("CLSIM_DATA"),
                        help="folder holding mnist/ (default: $CLSIM_DATA)")
    parser.add_argument("--wait-idle", type=float, default=120, metavar="SECONDS",
                        help="before each run, wait up to this long for the machine to be idle "
                        f"(under {IDLE_BUSY:.0%}% busy for 2 s); 0: do not wait (default: 120)")
    parser.add_argument("--retries", type=int, default=2,
                        help="run a configuration again, up to this many times, when other "
                        f"processes used more than {DISTURBED:.0%}% of a core during it; the "
                        "least disturbed run counts (default: 2)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the results folders (their paths are printed)")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when the 2-worker process pool's speed-up over 1 worker "
                        f"is below {TARGET_SPEEDUP}")
    args = parser.parse_args()
    if args.repeats < 1 or args.seeds < 1 or args.threads < 1:
        parser.error("--repeats, --seeds and --threads must be >= 1")
    if args.wait_idle < 0 or args.retries < 0:
        parser.error("--wait-idle and --retries must be >= 0")
    return args


def fail(message: str) -> NoReturn:
    """A setup error (no data, a clsim run that failed): one message on stderr, exit 2."""
    print(f"compare_scaling.py: {message}", file=sys.stderr)
    sys.exit(2)


def find_mnist(data_root: str | None) -> Path:
    """The data root holding mnist/, or exit 2 saying which path was tried."""
    hint = "set CLSIM_DATA (or pass --data-root) to the folder holding mnist/ (4 idx files)"
    if not data_root:
        fail(f"MNIST not found: no data root; {hint}")
    root = Path(data_root).expanduser().resolve()
    folder = root / "mnist"
    if not folder.is_dir() or not any(folder.glob("train-images-idx3-ubyte*")):
        fail(f"MNIST not found: {folder} does not exist or holds no train-images file; {hint}")
    return root


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (0 where unknown)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def busy_fraction(seconds: float, cores: int) -> float:
    """The fraction of all cores busy (every process) over the next ``seconds``."""
    cpu, started = machine_busy_seconds(), time.perf_counter()
    time.sleep(seconds)
    return (machine_busy_seconds() - cpu) / ((time.perf_counter() - started) * cores)


def wait_idle(limit: float, cores: int) -> tuple[float, float]:
    """Wait (at most ``limit`` s) until the machine was idle for 2 s; (waited s, busy then)."""
    started = time.perf_counter()
    while True:
        busy = busy_fraction(2.0, cores)
        waited = time.perf_counter() - started
        if busy < IDLE_BUSY or waited >= limit:
            return max(0.0, waited - 2.0), busy  # not counting the idle sample itself


class OtherCpu(threading.Thread):
    """CPU seconds used, while it runs, by processes that are not this one's descendants.

    Samples /proc every 0.2 s. A process counts as ours once its parent chain reaches this
    process (so Ray's raylet and workers, started by the CLI, are ours even after they
    are re-parented at shutdown). A foreign process that starts and ends between two
    samples goes uncounted, so the figure is a lower bound. 0 where /proc is missing.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seconds = 0.0
        self._stop_event = threading.Event()
        self._ours = {os.getpid()}
        self._last: dict[int, float] = {}
        self._tick = os.sysconf("SC_CLK_TCK")
        self._since = self._uptime_ticks()
        self._sample()

    def _uptime_ticks(self) -> float:
        try:
            return float(Path("/proc/uptime").read_text().split()[0]) * self._tick
        except OSError:
            return 0.0

    def _sample(self) -> None:
        table: dict[int, tuple[int, float, float]] = {}  # pid: ppid, cpu s, start tick
        for entry in os.scandir("/proc") if Path("/proc").is_dir() else ():
            if not entry.name.isdigit():
                continue
            try:
                text = Path(entry.path, "stat").read_text()
            except OSError:
                continue  # ended meanwhile
            fields = text[text.rfind(")") + 2 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / self._tick
            table[int(entry.name)] = (int(fields[1]), cpu, float(fields[19]))
        for pid in table:
            chain, seen = pid, set()
            while chain in table and chain not in self._ours and chain not in seen:
                seen.add(chain)
                chain = table[chain][0]
            if chain in self._ours:
                self._ours |= seen
        for pid, (_, cpu, start) in table.items():
            if pid not in self._ours:
                before = self._last.get(pid, 0.0 if start >= self._since else cpu)
                self.seconds += max(0.0, cpu - before)
            self._last[pid] = cpu

    def run(self) -> None:
        while not self._stop_event.wait(0.2):
            self._sample()

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        self._sample()
        return self.seconds


def load1() -> float:
    return os.getloadavg()[0]


def clsim_command(*args: str) -> list[str]:
    """The ``clsim`` console script, run with this interpreter (the same environment)."""
    return [sys.executable, "-c", "import sys; from clsim.cli import main; sys.exit(main())",
            *args]


# -----------------------------------------------------------------------------
# one run: a fresh CLI process into a fresh folder


def run_once(config: Config, scenario: Path, work: Path, env: dict[str, str], tag: str,
             keep: bool) -> Run:
    out = work / f"{config.key}-{tag}"
    command = clsim_command("compare", str(scenario), "--out", str(out), "--no-progress",
                            "--executor", config.executor, "--workers", str(config.workers),
                            "--threads", str(config.threads))
    load_before, cpu_before = load1(), machine_busy_seconds()
    others = OtherCpu()
    others.start()
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    cpu = machine_busy_seconds() - cpu_before
    other_cpu = others.stop()
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        fail(f"{config.label}: `clsim compare` exited {done.returncode}:\n{tail}")
    lines = (out / "cells.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    summary = (out / "summary.csv").read_text(encoding="utf-8")
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return Run(seconds, records, summary, load_before, load1(), cpu, other_cpu)


def warm_up(env: dict[str, str]) -> tuple[float, float]:
    """Import what the runs import and read MNIST once, so that the first timed run does not
    pay alone for a cold disk cache; then time, warm, what every fresh process pays before
    its first cell: (start-up and imports s, MNIST load s)."""
    if importlib.util.find_spec("ray") is not None:
        subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True,
                       check=False)
    code = ("import time, sys; t = time.perf_counter(); "
            "import torch, clsim.grid, clsim.compare, clsim.report, clsim_plugins.replay; "
            "from clsim.data.registry import load_dataset; u = time.perf_counter(); "
            "load_dataset('mnist'); print(u - t, time.perf_counter() - u)")
    seconds = (0.0, 0.0)
    for _ in range(2):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=False)
        wall = time.perf_counter() - started
        if done.returncode == 0:
            _, load = (float(x) for x in done.stdout.split())
            seconds = (wall - load, load)
    return seconds


# -----------------------------------------------------------------------------
# checks and report


def summary_without(text: str, column: str) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    for row in rows:
        row.pop(column, None)
    return rows


def compare_rows(a: list[dict[str, str]], b: list[dict[str, str]]) -> str:
    """'identical', or how many values of how many cells differ, and by how much at most."""
    if a == b:
        return "identical"
    if [r["cell"] for r in a] != [r["cell"] for r in b]:
        return "different cells"
    diffs = [(x["cell"], k, x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x
             if x[k] != y[k]]
    largest = 0.0
    for _, _, u, v in diffs:
        try:
            largest = max(largest, abs(float(u) - float(v)))
        except ValueError:
            largest = float("inf")
    return (f"{len(diffs)} value(s) in {len({d[0] for d in diffs})} cell(s) differ, by "
            f"{largest:.2g} at most (float sums in another order with another thread count)")


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f} s"


def describe(run: Run, workers: int) -> tuple[float, float, float]:
    """(fair share, imbalance, outside): the wall time = the three added up.

    fair share: the cells' own seconds divided among the workers; imbalance: how much
    longer the busiest worker's cells took than that; outside: the rest of the wall time,
    spent in no cell (CLI start-up, fail-fast data load, spawning workers or starting Ray,
    the report)."""
    busiest = max(run.per_worker.values())
    share = run.cell_seconds / workers
    return share, busiest - share, run.seconds - busiest


def main() -> int:
    args = parse_args()

    # setup: data, the grid, the configurations (default: 1 torch thread per cell)
    root = find_mnist(args.data_root)
    cores = available_cores()
    seeds = list(range(args.seeds))
    ray_ok = importlib.util.find_spec("ray") is not None
    configs = [
        Config("inline", "1 worker", "inline", 1, args.threads),
        Config("pool", "2 workers, process pool", "local", 2, args.threads),
    ]
    if not args.skip_ray and ray_ok:
        configs.append(Config("ray", "2 workers, Ray", "ray", 2, args.threads))
    if cores != args.threads:
        configs.append(Config("inline_all", "1 worker, every core", "inline", 1, cores))
    baseline = next(c for c in configs if c.key == "inline")
    all_cores = next((c for c in configs if c.threads == cores and c.workers == 1), baseline)

    n_cells = len(STRATEGIES) * len(EXEMPLARS) * len(seeds)
    print(f"clsim compare scaling: split MNIST (5 x 2 classes), MLP 400-400, SGD lr 0.01, batch "
          f"128, 1 epoch; {' + '.join(STRATEGIES)} x budgets model + "
          f"{' / '.join(map(str, EXEMPLARS))} exemplars x seeds {seeds} = {n_cells} cells")
    print(f"{cores} cores; torch threads per cell: {args.threads} in the 1- and 2-worker runs"
          + (f", {cores} in '{all_cores.label}'" if all_cores is not baseline else "")
          + f"; {args.repeats} repeat(s); each run is a fresh `clsim compare` process into a "
          f"fresh --out; MNIST from {root / 'mnist'}")
    if args.skip_ray:
        print("Ray: skipped (--skip-ray)")
    elif not ray_ok:
        print("Ray: skipped (not installed: pip install 'clsim[ray]')")
    env = dict(os.environ, CLSIM_DATA=str(root))
    start_load = os.getloadavg()
    print(f"load average before: {start_load[0]:.2f} {start_load[1]:.2f} {start_load[2]:.2f}"
          + (f"  (above {BUSY_LOAD}: the machine was busy lately; each run below waits for "
             "an idle machine and counts other processes' CPU)"
             if start_load[0] > BUSY_LOAD else ""))
    startup, loading = warm_up(env)
    print(f"a fresh Python process importing torch and clsim: {startup:.2f} s; loading MNIST "
          f"in it: {loading:.2f} s (what each spawned worker pays before its first cell ends)")

    # timed runs: every configuration once per repeat, the order rotating between repeats
    results = Results()
    work = Path(tempfile.mkdtemp(prefix="clsim-compare-scaling-"))
    scenario = work / "compare_scaling.yaml"
    scenario.write_text(scenario_yaml(seeds), encoding="utf-8")
    print("\nwaited s: for an idle machine; busy 2s: every core's busy share just before the "
          "run; load: 1-minute load average before and after; busy: every core's busy share "
          f"during the run (all processes; {1 / cores:.0%} is one core); other s: CPU seconds "
          "of processes not started by this benchmark during the run (a lower bound)")
    print(f"{'run':<7} {'configuration':<26} {'wall s':>8} {'waited':>7} {'busy 2s':>7} "
          f"{'load':>7} {'load':>7} {'busy':>7} {'other s':>7}")
    disturbed = 0
    for repeat in range(args.repeats):
        shift = repeat % len(configs)
        for config in configs[shift:] + configs[:shift]:
            attempts: list[Run] = []
            while not attempts or (attempts[-1].disturbed and len(attempts) <= args.retries):
                waited, busy_before = wait_idle(args.wait_idle, cores)
                tag = f"{repeat + 1}" + (f"-{len(attempts) + 1}" if attempts else "")
                run = run_once(config, scenario, work, env, tag, args.keep)
                run.busy_before, run.waited = busy_before, waited
                attempts.append(run)
                busy = run.machine_cpu_seconds / (run.seconds * cores)
                flag = ""
                if run.disturbed:
                    flag = "  <- disturbed" + (", again" if len(attempts) <= args.retries
                                                else ", kept the least disturbed")
                print(f"{tag:<7} {config.label:<26} {run.seconds:>8.2f} {waited:>7.0f} "
                      f"{busy_before:>7.0%} {run.load_before:>7.2f} {run.load_after:>7.2f} "
                      f"{busy:>7.0%} {run.other_cpu_seconds:>7.2f}{flag}", flush=True)
            best = min(attempts, key=lambda r: r.other_cpu_seconds / r.seconds)
            disturbed += best.disturbed
            results.runs[config.key].append(best)
    if args.keep:
        print(f"results folders kept under {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)

    # summary: median wall times, speed-ups, and where the wall time went (median run)
    base = results.median(baseline.key)
    print(f"\n{'configuration':<26} {'executor':<8} {'workers':>7} {'threads':>7} "
          f"{'wall s':>8} {'speed-up':>8} {'cells s':>8} {'share s':>8} {'imbal. s':>8} "
          f"{'outside s':>9} {'cpu s':>7}")
    for config in configs:
        wall = results.median(config.key)
        run = results.typical(config.key)
        share, imbalance, outside = describe(run, config.workers)
        print(f"{config.label:<26} {config.executor:<8} {config.workers:>7} {config.threads:>7} "
              f"{wall:>8.2f} {base / wall:>7.2f}x {run.cell_seconds:>8.2f} {share:>8.2f} "
              f"{imbalance:>8.2f} {outside:>9.2f} {run.own_cpu_seconds:>7.1f}")
    print("wall s: median; the other columns are of the run nearest the median. cells s: the "
          "cells' own wall seconds added up; share s: that divided among the workers; imbal. "
          "s: the busiest worker's extra; outside s: wall time in no cell (CLI start-up, "
          "fail-fast data load, worker spawn or Ray start/stop, report); wall s = share s + "
          "imbal. s + outside s. cpu s: CPU seconds the run used on the machine (every "
          "process but those counted in 'other s')")

    # cells: how long one took, and whether running side by side slowed them
    one = results.typical(baseline.key)
    cells = [r["wall_seconds"] for r in one.records]
    slow = {c.key: results.typical(c.key).cell_seconds / one.cell_seconds
            for c in configs if c.workers > 1}
    print(f"\none cell at {args.threads} thread(s), 1 worker: {min(cells):.2f} to "
          f"{max(cells):.2f} s (median {statistics.median(cells):.2f}); cells s with 2 workers "
          "over 1 worker: "
          + ", ".join(f"{key} {ratio:.2f}x" for key, ratio in slow.items())
          + " (above 1: cells ran slower side by side)")
    print("each worker's first cell, over the median of its strategy's other cells: "
          + ", ".join(f"{c.key} {seconds(results.typical(c.key).first_cell_extra())}"
                      for c in configs)
          + " (a once-per-process warm-up inside the first cell: lazy imports, the dataset)")

    # identical results: summary.csv of every run at the same thread count
    same = [c for c in configs if c.threads == args.threads]
    reference = results.runs[baseline.key][0].summary
    identical = all(r.summary == reference for c in same for r in results.runs[c.key])
    print(f"summary.csv identical across {', '.join(c.label for c in same)} "
          f"({args.threads} thread(s) per cell): {'yes' if identical else 'NO'}")
    if all_cores is not baseline:
        other = summary_without(results.runs[all_cores.key][0].summary, "threads")
        ours = summary_without(reference, "threads")
        print(f"summary.csv of '{all_cores.label}' ({cores} threads), apart from its threads "
              f"column: {compare_rows(ours, other)}")

    # verdicts: against 1 worker at the same threads, and against 1 worker using every core
    pool = base / results.median("pool")
    verdict = "met" if pool >= TARGET_SPEEDUP else "NOT met"
    end_load = os.getloadavg()
    print(f"\nload average after: {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}")
    if disturbed:
        print(f"note: {disturbed} counted run(s) shared the machine with other processes "
              "(see 'other s'); trust the speed-ups less, rerun on an idle machine")
    print(f"speed-up, 2 workers (process pool) over 1 worker, {args.threads} thread(s) per cell: "
          f"{pool:.2f}x   target >= {TARGET_SPEEDUP}: {verdict}")
    if "ray" in results.runs:
        print(f"speed-up, 2 workers (Ray) over 1 worker, {args.threads} thread(s) per cell: "
              f"{base / results.median('ray'):.2f}x")
    if all_cores is not baseline:
        honest = results.median(all_cores.key)
        print(f"speed-up over 1 worker using all {cores} cores ({cores} threads, "
              f"{honest:.2f} s), what a 1-worker user would run: process pool "
              f"{honest / results.median('pool'):.2f}x"
              + (f", Ray {honest / results.median('ray'):.2f}x" if "ray" in results.runs else ""))
    if not identical:
        return 1
    return 1 if args.check and pool < TARGET_SPEEDUP else 0


if __name__ == "__main__":
    sys.exit(main())
