"""Run every bundled scenario and write ``docs/results.md``: each one's results as its
command prints them, so every headline README quotes can be traced to a command and rerun.

Each scenario runs as a user would run it (``clsim run NAME``, or ``clsim compare NAME`` for
one with a ``compare`` section), in its own process, into ``runs/results/NAME``; the
console tables go to ``console.txt`` there beside the run's ``summary.json``. Every bundled
scenario pins ``threads: 1``, so its metrics repeat exactly on any machine; the times do
not (the page says which machine and how many runs shared it).

    CLSIM_DATA=/path/to/data python benchmarks/results.py            # all, 2 at a time
    python benchmarks/results.py hle_quick fscil_quick               # rerun some
    python benchmarks/results.py --page-only                         # rebuild the page
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch

from clsim.cli import bundled_scenarios
from clsim.config import parse_scenario, read_scenario_text

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS = REPO_ROOT / "runs" / "results"
PAGE = REPO_ROOT / "docs" / "results.md"
CLSIM = [sys.executable, "-m", "clsim"]


def command_for(name: str) -> list[str]:
    """The command a user types for this scenario (without the output folder)."""
    scenario = parse_scenario(read_scenario_text(bundled_scenarios()[name]), default_name=name)
    if scenario.compare is not None:
        return ["clsim", "compare", name, "--workers", "2"]
    return ["clsim", "run", name]


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=REPO_ROOT).stdout.strip()


def run_one(name: str, jobs: int) -> dict:
    """Run scenario ``name`` into ``runs/results/NAME`` (``jobs`` scenarios at once);
    return its timing record."""
    out = RUNS / name
    shutil.rmtree(out, ignore_errors=True)
    argv = command_for(name)
    full = CLSIM + argv[1:] + ["--out", str(out), "--no-progress"]
    commit = git_commit()  # the code this run imports
    started = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, cwd=REPO_ROOT)
    record = {
        "scenario": name,
        "command": shlex.join(argv),
        "returncode": proc.returncode,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "jobs": jobs,  # scenarios sharing the machine: the time is theirs too
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "console.txt").write_text(proc.stdout, encoding="utf-8")
    (out / "stderr.txt").write_text(proc.stderr, encoding="utf-8")
    (out / "timing.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
    print(f"{name}: {status} in {record['wall_seconds']} s", flush=True)
    return record


def tables_of(console: str) -> str:
    """The console's result tables, without the banner and the list of files written."""
    kept = [
        line for line in console.splitlines()
        if not line.startswith(("clsim: running", "results: ", "report: "))
    ]
    return "\n".join(kept).strip()


def first_sentence(name: str) -> str:
    lines = []
    for line in bundled_scenarios()[name].read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def plugin_reports(summary_path: Path) -> list[str]:
    """The plain numbers of each plugin's own report (TAME's experts and routing, ...),
    which the console tables leave out, as one Markdown line per plugin."""
    if not summary_path.exists():
        return []
    strategies = json.loads(summary_path.read_text(encoding="utf-8"))["strategies"]
    lines = []
    for strategy, record in strategies.items():
        for plugin, report in (record.get("plugins") or {}).items():
            scalars = [f"{key} {_shown(value)}" for key, value in report.items()
                       if isinstance(value, (int, float, str)) or _short_list(value)]
            if scalars:
                lines.append(f"- {strategy}, `{plugin}` report: {'; '.join(scalars)}")
    return ["", *lines] if lines else []


def _short_list(value: object) -> bool:
    return isinstance(value, list) and len(value) <= 12 and all(
        isinstance(v, (int, float)) for v in value)


def _shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


def write_page(names: list[str], jobs: int, note: str = "") -> None:
    """docs/results.md from whatever runs/results holds for ``names``."""
    timings = [json.loads((RUNS / n / "timing.json").read_text(encoding="utf-8"))
               for n in names if (RUNS / n / "timing.json").exists()]
    commits = sorted({t.get("commit", "?") for t in timings}) or [git_commit()]
    shared = sorted({t.get("jobs", 1) for t in timings}) or [jobs]
    parts = [
        "# Results of every bundled scenario",
        "",
        "Written by `python benchmarks/results.py` (it runs each command below into "
        "`runs/results/NAME` and copies the tables it prints). Every bundled scenario pins "
        "`threads: 1` and its seed, so each table repeats exactly with its command; the "
        "times are this machine's and vary.",
        "",
        f"Measured at commit {', '.join(f'`{c}`' for c in commits)} on "
        f"{platform.machine()} with {os.cpu_count()} cores, "
        f"torch {torch.__version__}, Python {platform.python_version()}; "
        f"{' or '.join(map(str, shared))} scenarios ran at once, so times are those of a "
        "machine shared by that many runs. Columns: final "
        "accuracy on every class seen; average incremental accuracy; forgetting; the bytes "
        "held at the peak (during training) and kept between experiences, against the "
        "budget (see README, \"Memory: measured, not declared\")." + (f" {note}" if note else ""),
        "",
        "| scenario | command | time | commit |",
        "|---|---|---|---|",
    ]
    sections = []
    for name in names:  # each run records the commit it ran at
        folder = RUNS / name
        timing_file = folder / "timing.json"
        if not timing_file.exists():
            parts.append(f"| [{name}](#{name}) | `{shlex.join(command_for(name))}` | not run | |")
            continue
        timing = json.loads(timing_file.read_text(encoding="utf-8"))
        ok = timing["returncode"] == 0
        shown = f"{timing['wall_seconds']:.0f} s" if ok else f"failed ({timing['returncode']})"
        parts.append(f"| [{name}](#{name}) | `{timing['command']}` | {shown} | "
                     f"`{timing.get('commit', '?')}` |")
        sections += ["", f"## {name}", "", first_sentence(name), "",
                     f"`{timing['command']}` ({timing['wall_seconds']:.0f} s)", ""]
        report = folder / "report.md"
        if ok and report.exists():  # a comparison: its report, one heading level down
            lines = report.read_text(encoding="utf-8").splitlines()[1:]
            sections += [("#" + line) if line.startswith("## ") else line for line in lines]
            continue
        body = tables_of((folder / "console.txt").read_text(encoding="utf-8"))
        if not ok:
            body += "\n" + (folder / "stderr.txt").read_text(encoding="utf-8").strip()
        sections += ["```", body, "```", *plugin_reports(folder / "summary.json")]
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text("\n".join(parts + sections) + "\n", encoding="utf-8")
    print(f"wrote {PAGE}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="scenarios to run (default: every one)")
    parser.add_argument("--jobs", type=int, default=2, help="scenarios run at once")
    parser.add_argument("--page-only", action="store_true", help="rebuild the page only")
    parser.add_argument("--note", default="", help="a sentence for the page's header (what "
                        "else loaded the machine, say)")
    args = parser.parse_args(argv)
    every = sorted(bundled_scenarios())
    unknown = sorted(set(args.names) - set(every))
    if unknown:
        parser.error(f"not bundled scenarios: {', '.join(unknown)}")
    if not every:
        parser.error("no bundled scenarios: install clsim (make venv)")
    failed: list[str] = []
    if not args.page_only:
        todo = args.names or every
        jobs = max(1, args.jobs)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            records = list(pool.map(lambda name: run_one(name, jobs), todo))
        failed = [r["scenario"] for r in records if r["returncode"] != 0]
        if failed:
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
    write_page(every, args.jobs, args.note)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
