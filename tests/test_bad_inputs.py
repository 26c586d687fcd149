"""The bad-input corpus (tests/bad_inputs/cases.yaml): every malformed scenario or CLI
call exits non-zero with one message naming the file (or argument) and the key path,
never a traceback, and never touches what is already on disk."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO_ROOT, run_cli

from clsim.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
# cases.yaml, plus one cases_AREA.yaml per area of faults (each with its setups_AREA.py)
CASE_FILES = sorted(CORPUS.glob("cases*.yaml"))
SETUP_FILES = sorted(CORPUS.glob("setups_*.py"))
CASES: list[dict] = [
    case for path in CASE_FILES
    for case in yaml.safe_load(path.read_text(encoding="utf-8"))["cases"]
]
BY_ID = {case["id"]: case for case in CASES}


# ---------------------------------------------------------------------------
# files written at test time, so the corpus commits no binary or generated data
# ---------------------------------------------------------------------------

_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _garbage_idx(tmp: Path) -> None:
    folder = tmp / "data" / "mnist"
    folder.mkdir(parents=True)
    for stem in _IDX_STEMS:
        (folder / stem).write_bytes(b"<html>404 Not Found</html>\n" * 4)


def _truncated_idx(tmp: Path) -> None:
    """Headers that promise 60000 28x28 images and labels, with 100 bytes of values each."""
    folder = tmp / "data" / "mnist"
    folder.mkdir(parents=True)
    images = bytes([0, 0, 0x08, 3]) + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    labels = bytes([0, 0, 0x08, 1]) + (60000).to_bytes(4, "big")
    for stem in _IDX_STEMS:
        header = images if "images" in stem else labels
        (folder / stem).write_bytes(header + bytes(100))


def _results_folder(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "summary.json").write_text('{"strategies": {"earlier": "results"}}\n')
    (tmp / "out" / "events.jsonl").write_text('{"event": "run_end"}\n')


def _out_is_a_file(tmp: Path) -> None:
    (tmp / "out").write_text("notes the user keeps here\n")


def _comparison_folder(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "grid.json").write_text('{"scenario_sha256": "earlier"}\n')
    (tmp / "out" / "cells.jsonl").write_text('{"cell": "naive | 32KB | seed 0"}\n')


def _cells(tmp: Path, content: bytes) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "cells.jsonl").write_bytes(content)


SETUPS = {
    "garbage_idx": _garbage_idx,
    "truncated_idx": _truncated_idx,
    "results_folder": _results_folder,
    "out_is_a_file": _out_is_a_file,
    "comparison_folder": _comparison_folder,
    "report_garbage_lines": lambda tmp: _cells(
        tmp, b'not json\n{broken\n[1, 2]\n{"cell": [1]}\n'
    ),
    "report_records_missing_keys": lambda tmp: _cells(
        tmp, b'{"cell": "naive | 1KB | seed 0", "status": "ok"}\n'
    ),
    "report_not_utf8": lambda tmp: _cells(tmp, b'\xff\xfe{"cell": "\xe9"}\n'),
}


def _area_setups(path: Path) -> dict:
    """``SETUPS`` of one ``setups_AREA.py`` beside the corpus (name -> fn(tmp))."""
    spec = importlib.util.spec_from_file_location(f"bad_input_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SETUPS


for _path in SETUP_FILES:
    _extra = _area_setups(_path)
    assert not set(_extra) & set(SETUPS), f"{_path.name} repeats a setup name"
    SETUPS.update(_extra)


# ---------------------------------------------------------------------------
# running one call of a case
# ---------------------------------------------------------------------------


def _scenario_file(case: dict) -> str | None:
    """The case's scenario file name: its own ID.yaml, a named one, or none (CLI cases)."""
    if "file" in case:
        return case["file"]
    if "argv" in case and not any("{file}" in arg for call in case["argv"] for arg in call):
        return None
    return f"{case['id']}.yaml"


def _prepare(case: dict, tmp: Path) -> Path | None:
    name = _scenario_file(case)
    if case.get("setup"):
        SETUPS[case["setup"]](tmp)
        if name:  # beside the files the setup wrote, so relative paths find them
            shutil.copy(CORPUS / name, tmp / name)
            return tmp / name
    return CORPUS / name if name else None


def _argv(call: list[str], file: Path | None, tmp: Path) -> list[str]:
    values = {"file": str(file), "tmp": str(tmp), "corpus": str(CORPUS)}
    return [arg.format(**values) for arg in call]


def _snapshot(tmp: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tmp)): p.read_bytes() for p in tmp.rglob("*") if p.is_file()}


def _check_message(case: dict, file: Path | None, code: int, out: str, err: str) -> None:
    """Exit code, one clean message naming file or argument and key path, no traceback."""
    assert code == case.get("exit", 2), err
    assert "Traceback" not in out + err
    assert "clsim: error:" in err, err  # not "clsim: internal error" (a bug in clsim)
    assert case["says"] in err, err
    names = case.get("names", [file.name] if file else [])
    for name in names:
        assert name in err, err
    if case.get("key") is not None:
        if file is not None and "names" not in case:
            # the key is the location, right after the file (and line): file:7: key: ...
            location = rf"{re.escape(file.name)}(:\d+)?: {re.escape(case['key'])}: "
            assert re.search(location, err), err
        else:
            assert case["key"] in err, err
    if "line" in case:
        assert f"{file.name}:{case['line']}:" in err, err


CALLS = [
    pytest.param(case, index, id=case["id"] if len(case.get("argv", [[]])) == 1
                 else f"{case['id']}-{call[0]}")
    for case in CASES
    for index, call in enumerate(case.get("argv", [["validate", "{file}"]]))
]


@pytest.mark.parametrize(("case", "index"), CALLS)
def test_bad_input_fails_cleanly_naming_file_and_key(case, index, tmp_path, capsys):
    """In-process: the call fails with its message; files already on disk stay as they
    were, and a failed call writes nothing new (no half-made results folder)."""
    file = _prepare(case, tmp_path)
    call = _argv(case.get("argv", [["validate", "{file}"]])[index], file, tmp_path)
    before = _snapshot(tmp_path)
    try:
        code = main(call)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    captured = capsys.readouterr()
    _check_message(case, file, code, captured.out, captured.err)
    assert _snapshot(tmp_path) == before


SUBPROCESS_CASES = ["not_utf8", "yaml_python_object_tag", "data_garbage_idx",
                    "cli_run_seed_negative"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_through_a_real_process(case_id, tmp_path):
    """As a shell user meets it: a fresh interpreter, real exit status, no traceback."""
    case = BY_ID[case_id]
    file = _prepare(case, tmp_path)
    call = _argv(case.get("argv", [["validate", "{file}"]])[-1], file, tmp_path)
    proc = run_cli(*call, cwd=tmp_path)
    _check_message(case, file, proc.returncode, proc.stdout, proc.stderr)


def test_console_script_exits_non_zero_without_traceback(tmp_path):
    """The installed ``clsim`` entry point (not only ``python -m``) reports cleanly."""
    script = Path(sys.executable).parent / "clsim"
    assert script.is_file(), "the clsim console script is not installed in this environment"
    case = BY_ID["alias_bomb"]
    file = _prepare(case, tmp_path)
    proc = subprocess.run([str(script), "validate", str(file)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)
    _check_message(case, file, proc.returncode, proc.stdout, proc.stderr)


# ---------------------------------------------------------------------------
# the corpus itself
# ---------------------------------------------------------------------------


def test_corpus_has_at_least_40_cases_and_no_orphan_files():
    """The corpus cannot silently shrink, and every file in it is exercised."""
    assert len(CASES) >= 40
    assert len(BY_ID) == len(CASES), "case ids repeat"
    files = {p.name for p in CORPUS.iterdir() if p.is_file()} - {
        p.name for p in CASE_FILES + SETUP_FILES}
    used = {_scenario_file(case) for case in CASES} - {None}
    assert len(files) >= 40
    assert used == files
    for case in CASES:
        assert case.get("setup") in (None, *SETUPS), case["id"]
        assert case["says"], case["id"]
        assert case.get("key") is not None or "line" in case or _scenario_file(case) \
            or case.get("names"), f"{case['id']} checks neither key, line nor a name"


def test_corpus_covers_every_section_and_stream_type():
    """Each level of a scenario, each stream family and several plugins have a case."""
    keys = {case["key"] for case in CASES if case.get("key")}
    for prefix in ("data.", "stream.", "model.", "training.", "training.optimizer.",
                   "strategies.", "compare.", "budget", "seed", "device", "threads"):
        assert any(k.startswith(prefix) for k in keys), prefix
    for plugin in ("replay", "memo", "prd", "analytic", "tame", "language_head"):
        assert any(f".{plugin}." in k for k in keys), plugin
    texts = {p.name: p.read_bytes() for p in CORPUS.glob("*.yaml") if p not in CASE_FILES}
    for stream_type in ("hierarchical", "few_shot", "si_blurry", "gradual", "recurring"):
        assert any(f"type: {stream_type}".encode() in t for t in texts.values()), stream_type
    calls = {call[0] for case in CASES for call in case.get("argv", [["validate"]]) if call}
    assert calls >= {"validate", "run", "compare", "report", "list", "new-plugin"}


def test_not_utf8_case_really_is_not_utf8():
    """An editor that re-saved the file as UTF-8 would silently empty this case."""
    raw = (CORPUS / "not_utf8.yaml").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    assert raw.decode("latin-1").count("caf\xe9") == 1
