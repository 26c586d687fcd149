"""Where the cells of a comparison run: inline, in a local process pool, or on Ray.

Every executor takes the same :class:`clsim.grid.CellTask` list and yields the same
records (from :func:`clsim.grid.run_cell`) as cells finish, so the results files do not
depend on where the work ran. Each cell runs with ``task.threads`` torch threads, chosen
so that cells running side by side do not oversubscribe the cores.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from clsim.errors import ConfigError
from clsim.grid import CellTask, run_cell
from clsim.interrupts import is_contained, track_user_interrupts

Record = dict[str, Any]
OnStart = Callable[[CellTask], None]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_cell(workers: int, cores: int | None = None) -> int:
    """Torch threads for each of ``workers`` concurrent cells on ``cores`` cores."""
    return max(1, (cores or available_cores()) // max(1, workers))


def _failed(task: CellTask, error: str) -> Record:
    return task.record(status="failed", error=error)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` (the process that started it) dies, even by
    SIGKILL, so no worker is left running cells for nobody.

    Linux: the kernel sends SIGKILL at the parent's death (``PR_SET_PDEATHSIG``); the
    parent may have died before the call, so it is checked after. Elsewhere: a daemon
    thread polls the parent id.
    """
    if not (sys.platform.startswith("linux") and _set_parent_death_signal(signal.SIGKILL)):
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                         name="clsim-parent-watch").start()
    if os.getppid() != parent_pid:  # died before the signal was armed: go now
        os._exit(1)


def _set_parent_death_signal(sig: int) -> bool:
    """Whether prctl(PR_SET_PDEATHSIG, sig) succeeded."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, every: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(every)
    os._exit(1)


def _start_worker(parent_pid: int) -> None:
    """A pool worker's initializer: dies with clsim; records the user's Ctrl-C, so a
    plugin's own KeyboardInterrupt fails only its cell (:mod:`clsim.interrupts`)."""
    die_with_parent(parent_pid)
    track_user_interrupts()


# Run by a separate interpreter beside a local Ray cluster (python -c, so it imports nothing
# of clsim or torch): every half second it notes the driver's descendants (pid and start
# time, from /proc); once the driver is gone it SIGKILLs those still alive. Ray's own
# fate-sharing ends the raylet and GCS with the driver, but its dashboard and runtime-env
# agents hang on their way out and would stay forever.
_RAY_WATCHDOG = """
import os, signal, sys, time
driver = int(sys.argv[1])
def stat(pid):
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return int(fields[1]), fields[19]
def descendants():
    parents = {}
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                parents[int(name)] = stat(int(name))
            except (OSError, IndexError, ValueError):
                pass
    found, todo = {}, [driver]
    while todo:
        pid = todo.pop()
        for child, (ppid, started) in parents.items():
            if ppid == pid and child != os.getpid() and child not in found:
                found[child] = started
                todo.append(child)
    return found
seen = {}
while os.getppid() == driver:
    seen.update(descendants())
    time.sleep(0.5)
for pid, started in seen.items():
    try:
        if stat(pid)[1] == started:
            os.kill(pid, signal.SIGKILL)
    except (OSError, IndexError, ValueError):
        pass
"""


def start_ray_watchdog() -> subprocess.Popen | None:
    """A process that kills what the local Ray cluster left if this one is killed (Linux:
    reads /proc); None elsewhere."""
    if not Path("/proc/self/stat").exists():
        return None
    return subprocess.Popen([sys.executable, "-c", _RAY_WATCHDOG, str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def run_inline(tasks: list[CellTask], on_start: OnStart = lambda t: None) -> Iterator[Record]:
    """One cell after another, in this process."""
    for task in tasks:
        on_start(task)
        record = run_cell(task)
        yield record


def run_process_pool(
    tasks: list[CellTask], workers: int, on_start: OnStart = lambda t: None
) -> Iterator[Record]:
    """Each cell in a worker process (spawned: no state inherited from this one).

    A worker that dies (killed, out of memory) fails only the cell it was running; the
    pool is rebuilt for the cells still waiting. Workers die with this process, even
    when it is killed (:func:`die_with_parent`). Closing the generator early (the
    consumer stopped: the user's Ctrl-C, a full disk) cancels the cells not started and
    ends the workers at once, without waiting for the cells they are running.
    """
    waiting = list(tasks)
    context = multiprocessing.get_context("spawn")
    while waiting:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                   initializer=_start_worker, initargs=(os.getpid(),))
        running = {}
        broken = False
        finished = False
        try:
            while (waiting or running) and not broken:
                while waiting and len(running) < workers:
                    task = waiting.pop(0)
                    on_start(task)
                    running[pool.submit(run_cell, task)] = task
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    record, died = _outcome(future, task)
                    broken = broken or died
                    yield record  # never inside an except: a close() must go through
            finished = True
        finally:
            if finished or broken:
                pool.shutdown(wait=True)
            else:  # closed early, or an exception: nobody will read the running cells
                _abandon(pool)
        if broken:  # the other in-flight cells go back to the queue
            waiting = list(running.values()) + waiting


def _outcome(future, task: CellTask) -> tuple[Record, bool]:
    """The record of a finished future, and whether its worker died (the pool is then
    broken)."""
    try:
        return future.result(), False
    except BrokenProcessPool:
        return _failed(task, "the worker process running this cell died (killed, or out "
                       "of memory)"), True
    except BaseException as exc:  # only a SIGINT sent to the worker alone gets here
        if not is_contained(exc):  # (run_cell records the rest)
            raise
        return _failed(task, f"the worker process running this cell raised "
                       f"{type(exc).__name__}"), False


def _abandon(pool: ProcessPoolExecutor) -> None:
    """Stop ``pool`` now: cancel the cells not started and end the workers (SIGTERM,
    then SIGKILL for one still alive after a second), reaping them."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # before shutdown
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        try:
            process.terminate()
        except (OSError, ValueError, AttributeError):  # already gone, or already closed
            pass
    deadline = time.monotonic() + 1.0
    for process in processes:
        try:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(1.0)
        except (OSError, ValueError, AttributeError, AssertionError):
            pass


def run_ray(
    tasks: list[CellTask], workers: int, address: str | None, on_start: OnStart = lambda t: None
) -> Iterator[Record]:
    """One Ray task per cell, on the cluster at ``address`` or on a local one started here.

    Every node of a remote cluster needs clsim installed and the datasets at the path the
    scenario names (or under its own $CLSIM_DATA). A local cluster binds to the loopback
    address only (Ray would otherwise listen on the machine's network address).
    """
    if not address:  # read by Ray at import, and inherited by the processes it starts
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'clsim[ray]'") from None
    started_here = not ray.is_initialized()
    watchdog = None
    if started_here:
        options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        try:
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(address="local", num_cpus=workers, **options)  # never a running one
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address!r}" if address else "a local Ray cluster"
            raise ConfigError(f"cannot start or reach {where}: {exc}") from None
        if not address:
            watchdog = start_ray_watchdog()
    remote_cell = ray.remote(num_cpus=1, max_retries=0)(_ray_cell)
    try:
        pending = {}
        for task in tasks:
            on_start(task)
            pending[remote_cell.remote(task)] = task
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(done[0])
            try:
                record = ray.get(done[0])
            except Exception as exc:  # the worker died: the cell fails, the grid goes on
                record = _failed(task, f"the Ray worker running this cell failed: {exc}")
            yield record  # never inside an except: a close() must go through
    finally:
        try:
            if started_here:
                ray.shutdown()
        finally:  # even when the shutdown fails: the watchdog would outlive it
            if watchdog is not None:  # the cluster is down: nothing left to watch
                watchdog.kill()
                watchdog.wait()


def _ray_cell(task: CellTask) -> Record:
    """A cell on a Ray worker. The worker records a SIGINT (the user's Ctrl-C reaching
    it, or ray.cancel) as pool workers and clsim do, so a KeyboardInterrupt a plugin
    raises itself fails only its cell (:mod:`clsim.interrupts`)."""
    track_user_interrupts()
    return run_cell(task)
