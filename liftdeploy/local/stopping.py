"""How `liftdeploy serve --local` stops: on Ctrl-C (SIGINT) or SIGTERM (what Docker, systemd,
Kubernetes and CI runners send), alike, on either engine.

While the model loads, a signal ends whatever the engine has started so far and exits 0 at once.
Once serving, the first signal raises `Stop` in the main thread; `serve` then refuses new
requests, answers each running one 503 ("the server is stopping"; its generation is aborted),
stops the engine, ends every process the engine started (vLLM's engine core and workers: given
`GRACE` seconds to exit, then SIGTERM, then SIGKILL), and exits 0 with one line. A second signal
while it stops skips the waiting: those processes are killed at once and it exits 128 + the
signal's number.

multiprocessing's resource tracker, which vLLM starts, is left to exit by itself: it ignores
SIGINT and SIGTERM, ends when `serve` does (its pipe closes), and on its way out removes the shared
memory and semaphores the engine leaked (vLLM kills its engine core after 5 s; so does a stop while
loading), warning of each leak after serve's last line: `quiet_resource_tracker` silences that.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

__all__ = ["GRACE", "Stop", "StopSignals", "end_processes", "exit_within", "quiet_resource_tracker",
           "started_processes"]

GRACE = 10.0  # seconds the engine's processes get to exit after the engine is told to stop
TERM_GRACE = 3.0  # after SIGTERM, before SIGKILL
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: stop serving (a KeyboardInterrupt, so nothing swallows it)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class StopSignals:
    """While entered, SIGINT and SIGTERM stop `serve`.

    While the model loads (`serving` still false) nothing is running to answer, and an exception
    raised into vLLM's start can be lost (pyzmq retries an interrupted poll): a signal ends the
    processes started so far and exits 0 at once. Once serving, the first signal raises `Stop`; a
    second one, while the stop runs, kills the engine's processes and exits at once."""

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self.serving = False
        self.stopping = False
        self.processes: list[Any] = []  # psutil.Process: every descendant when the stop began
        self._before: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in SIGNALS:
            self._before[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)

    def begin(self) -> None:
        """The stop begins: note the processes started (before one exits and orphans its own), and
        from now on let a signal end them at once rather than interrupt the stop."""
        if not self.stopping:
            self.stopping = True
            self.processes = started_processes()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.stopping and self.serving:
            self.received = name
            self.begin()
            raise Stop(name)
        end_processes(self.processes + started_processes(), grace=0, ending=("kill",))  # not a line from them
        if self.stopping:
            print(f"stopped at once on {name}", file=sys.stderr)
            _exit_now(128 + signum)
        print(f"stopped on {name} while loading the model", file=sys.stderr)
        _exit_now(0)


def started_processes() -> list[Any]:
    """Every process this one started, and theirs (psutil.Process objects)."""
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def end_processes(processes: list[Any], grace: float = GRACE,
                  ending: tuple[str, ...] = ("terminate", "kill")) -> list[Any]:
    """Wait up to `grace` seconds for `processes` to exit, then SIGTERM the rest, then SIGKILL
    (`ending`: the psutil.Process methods, in turn); returns those still alive (none, unless one is
    stuck in the kernel). The resource tracker is left to exit by itself (see the module's docstring)."""
    import psutil

    tracker = _resource_tracker_pid()
    alive = list({p.pid: p for p in processes if p.pid != tracker}.values())
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for method in ending:
        if not alive:
            break
        for process in alive:
            with contextlib.suppress(psutil.Error):
                getattr(process, method)()
        _, alive = psutil.wait_procs(alive, timeout=TERM_GRACE)
    return alive


def quiet_resource_tracker() -> None:
    """Let the resource tracker vLLM starts remove what the engine leaked without a warning for
    each (nothing a user can act on). Its interpreter takes this one's -W options when it starts."""
    sys.warnoptions.append("ignore:resource_tracker:UserWarning")


def _resource_tracker_pid() -> int | None:
    from multiprocessing import resource_tracker

    pid = getattr(resource_tracker._resource_tracker, "_pid", None)
    return pid if isinstance(pid, int) else None


def exit_within(seconds: float, code: int = 0) -> None:
    """Make sure this process exits with `code` within `seconds`, even if a worker thread would hold
    Python's exit (a schema compile cannot be interrupted: it is C++)."""
    timer = threading.Timer(seconds, _exit_now, (code,))
    timer.daemon = True  # runs on while Python waits for the other threads at exit
    timer.start()


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
