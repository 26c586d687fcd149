"""Checkpoints of a strategy in progress: everything needed to continue after a kill.

After each experience the engine saves the model, every plugin's state, the optimizer
state plugins keep, every random generator, and the state the trainer and the stream
loop hand over through their ``state_dict`` methods (batch order, scores so far, ledger,
stream position) (:func:`capture`), written to a temporary file and renamed into place, so a
checkpoint on disk is always whole. :func:`restore` puts a fresh run into that state; the
rest of the stream then gives the same final metrics as a run never interrupted. Files are
read with ``torch.load(weights_only=True)`` and decoded by :mod:`clsim.snapshot`, so
loading one never runs code from the file, and a checkpoint of another scenario, seed or
strategy is refused.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

import clsim
from clsim.errors import ResultsWriteError
from clsim.files import require_file
from clsim.results import safe_name, write_atomic
from clsim.snapshot import Decoder, Encoder, SnapshotError, allowed_modules, as_tuples

FORMAT = "clsim-checkpoint/2"


def fingerprint(config: dict[str, Any], seed: int, limit: int | None, strategy: str) -> str:
    """What a checkpoint must match to be resumed: the resolved scenario, seed, sample
    limit and strategy."""
    text = json.dumps([config, seed, limit, strategy], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_path(out_dir: Path, index: int, strategy: str) -> Path:
    """``checkpoints/<n>-<name>.pt``, the name cut (with a hash) as the strategy's
    TensorBoard folder is (:func:`clsim.results.safe_name`); the index keeps strategies
    apart. Every name that fits (up to 100 bytes) is kept as it is."""
    return out_dir / "checkpoints" / f"{index}-{safe_name(strategy)}.pt"


@dataclass
class Checkpointing:
    """Where one strategy's checkpoint goes, and the one to continue from, if any."""

    path: Path
    fingerprint: str
    resume_from: dict[str, Any] | None = None
    unavailable: str | None = None  # why this strategy cannot be checkpointed
    written: list[int] = field(default_factory=list)  # experiences checkpointed

    def save(self, loop: Any, next_experience: int, wall_seconds: float) -> None:
        """Write the run's state; a strategy whose state cannot be saved (or written) is
        run on without checkpoints, and says why: the results are never put at risk. The
        first file is read back as a resume would read it."""
        if self.unavailable:
            return
        try:
            payload = capture(loop, next_experience, wall_seconds, self.fingerprint)
            write_checkpoint(self.path, payload)
            if not self.written:
                torch.load(self.path, weights_only=True, map_location="cpu")
        except RecursionError:
            self._give_up(loop, "its state is nested too deeply to save")
            return
        except (SnapshotError, ResultsWriteError, OSError, ValueError, TypeError,
                RuntimeError, pickle.UnpicklingError) as exc:
            self._give_up(loop, str(exc) if isinstance(exc, (SnapshotError, ResultsWriteError))
                          else f"{type(exc).__name__}: {str(exc)[:300]}")
            return
        self.written.append(next_experience)

    def _give_up(self, loop: Any, reason: str) -> None:
        self.unavailable = reason
        self.discard()
        loop.ctx.log("checkpoint_unavailable", reason=reason)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()  # only when empty
        except OSError:
            pass


def remove_partial_writes(out_dir: Path) -> None:
    """Delete temporary files a kill left in ``checkpoints/`` mid-write."""
    for partial in (out_dir / "checkpoints").glob(".*.pt.*"):
        partial.unlink(missing_ok=True)


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` the payload atomically (a kill leaves the old file or the new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda handle: torch.save(payload, handle))


def read_checkpoint(path: Path, expected_fingerprint: str) -> dict[str, Any]:
    """A checkpoint file, loaded without unpickling objects, checked to be this run's."""
    require_file(path, "checkpoint", SnapshotError)  # a FIFO would block torch.load
    try:
        payload = torch.load(path, weights_only=True, map_location=None)
    except Exception as exc:  # truncated, not a torch file, or holding objects
        raise SnapshotError(f"checkpoint {path} cannot be read safely ({type(exc).__name__}: "
                            f"{str(exc)[:300]}); delete it to run this strategy from the "
                            "start") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SnapshotError(f"checkpoint {path} is not a {FORMAT} file; delete it to run "
                            "this strategy from the start")
    if payload.get("clsim_version") != clsim.__version__:
        raise SnapshotError(f"checkpoint {path} was written by clsim "
                            f"{payload.get('clsim_version')}, this is {clsim.__version__}; "
                            "resume with that version, or delete it to run this strategy "
                            "from the start")
    if payload.get("fingerprint") != expected_fingerprint:
        raise SnapshotError(f"checkpoint {path} was written for a different scenario, seed, "
                            "limit or strategy; it cannot be resumed by this run")
    return payload


def capture(loop: Any, next_experience: int, wall_seconds: float,
            fingerprint_: str) -> dict[str, Any]:
    """The state of a run between experiences, as plain data (see :mod:`clsim.snapshot`)."""
    ctx, trainer = loop.ctx, loop.trainer
    instances = [instance for _, instance in loop.plugins]
    encoder = Encoder(allowed_modules(instances), _externals(loop))
    for instance in instances:  # first, so a plugin reached from another's state is a ref
        encoder.reserve(instance)
    plugins = [encoder.encode_reserved(instance, f"plugin {name!r}")
               for name, instance in loop.plugins]
    state = {
        "plugins": plugins,
        "model": encoder.encode(ctx.model, "the model"),
        "trainer": encoder.encode(trainer.state_dict(), "the trainer"),
        "loop": encoder.encode(loop.state_dict(), "the engine"),
    }
    return {
        "format": FORMAT,
        "clsim_version": clsim.__version__,
        "fingerprint": fingerprint_,
        "strategy": loop.strategy.name,
        "plugin_classes": [type(p).__qualname__ for p in instances],
        "next_experience": next_experience,
        "wall_seconds": wall_seconds,
        "allowed_modules": list(encoder.allowed),
        "state": state,
        "hook_ids": RemovableHandle.next_id,  # restored hooks keep their ids
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if ctx.device.type == "cuda" else [],
            "numpy": _numpy_state(),
            "python": random.getstate(),
        },
    }


def restore(loop: Any, payload: dict[str, Any], path: Path | None = None) -> int:
    """Put a freshly set-up run into the checkpointed state; returns the index of the
    next experience to train on. A checkpoint that does not decode is a SnapshotError."""
    try:
        return _restore(loop, payload)
    except SnapshotError as exc:
        problem = str(exc)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        problem = f"it is damaged ({type(exc).__name__}: {str(exc)[:200]})"
    raise SnapshotError(f"checkpoint {path or ''} cannot be restored: {problem}; delete it to "
                        "run this strategy from the start")


def _restore(loop: Any, payload: dict[str, Any]) -> int:
    start = _next_experience(loop, payload)
    ctx, trainer = loop.ctx, loop.trainer
    instances = [instance for _, instance in loop.plugins]
    names = [type(p).__qualname__ for p in instances]
    if names != payload["plugin_classes"]:
        raise SnapshotError(f"the checkpoint was written by plugins {payload['plugin_classes']}"
                            f", this run has {names}")
    decoder = Decoder(allowed_modules(instances), _externals(loop))
    state = payload["state"]
    for instance, node in zip(instances, state["plugins"], strict=True):
        decoder.memo[node["id"]] = instance  # restored in place: pluggy holds these objects
    for instance, node in zip(instances, state["plugins"], strict=True):
        decoder.fill(instance, node)
    ctx.model = decoder.decode(state["model"])
    trainer.load_state_dict(decoder.decode(state["trainer"]))
    loop.load_state_dict(decoder.decode(state["loop"]))
    RemovableHandle.next_id = max(RemovableHandle.next_id, int(payload["hook_ids"]))
    rng = payload["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(_numpy_tuple(rng["numpy"]))
    random.setstate(as_tuples(rng["python"]))
    _check_position(loop)
    return start


def _next_experience(loop: Any, payload: dict[str, Any]) -> int:
    """The checkpoint's next experience, checked to be a boundary inside this run's
    stream (a checkpoint is written after an experience that is not the last)."""
    shown = len(loop.stream.seen_by_strategy())
    value = payload["next_experience"]
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < shown:
        raise SnapshotError(f"its next_experience is {str(value)[:40]!r}, where this run's "
                            f"stream continues only at experience 1 to {shown - 1}")
    for key in ("wall_seconds", "hook_ids"):
        number = payload[key]
        if not isinstance(number, (int, float)) or isinstance(number, bool) \
                or not 0 <= number < float("inf"):
            raise SnapshotError(f"its {key} is {str(number)[:40]!r}, not a count")
    return value


def _check_position(loop: Any) -> None:
    """The restored stream position and labels seen fit this run's stream."""
    total = sum(exp.n_train for exp in loop.stream.seen_by_strategy())
    if not 0 <= loop.position <= total:
        raise SnapshotError(f"its stream position is {loop.position}, outside this run's "
                            f"0 to {total} training samples")
    if tuple(loop.seen.shape) != (loop.stream.labels.n_classes,):
        raise SnapshotError(f"it has seen-label flags for {tuple(loop.seen.shape)} labels, "
                            f"this run has {loop.stream.labels.n_classes}")


def _externals(loop: Any) -> dict[str, object]:
    """Objects a checkpoint names instead of saving: the run's wiring and its data."""
    ctx = loop.ctx
    externals: dict[str, object] = {"ctx": ctx, "data": ctx.data, "trainer": loop.trainer,
                                    "hooks": loop.hooks, "stream": loop.stream}
    if ctx.labels is not None:
        externals["labels"] = ctx.labels
    for i, exp in enumerate(loop.stream):
        externals[f"experience:{i}"] = exp
        for name in ("train_x", "train_y", "test_x", "test_y"):
            externals[f"experience:{i}.{name}"] = getattr(exp, name)
    return externals


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
            "has_gauss": has_gauss, "gauss": gauss}


def _numpy_tuple(state: dict[str, Any]) -> tuple:
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
            state["has_gauss"], state["gauss"])

