"""The processes a local deployment starts: each in its own session, all stopped by PID whatever happens.

Each process is started in its own session (process group), so that its
children (a SuperNode's SuperExec and ClientApp processes) go with it. The
SuperLink starts its SuperExec in a *new* session, outside the SuperLink's
group; therefore every process also carries a unique environment marker
(``MSFUSION_DEPLOYMENT_ID``) and, on Linux, stopping also ends each remaining
process whose environment holds that marker, by PID. Only the standard library.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
MARKER_KEY = "MSFUSION_DEPLOYMENT_ID"
TERMINATING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class DeploymentError(RuntimeError):
    """A component failed to start, or a Flower CLI call failed."""


class Interrupted(BaseException):
    """Raised by the launcher's signal handlers so that ``finally`` blocks run."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _proc_stat_state(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it only waits to be reaped)."""
    if Path("/proc").is_dir():
        state = _proc_stat_state(pid)
        return state is not None and state != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pids_with_marker(marker: str) -> list[int]:
    """Live PIDs whose environment holds ``MSFUSION_DEPLOYMENT_ID=marker`` (Linux; [] elsewhere)."""
    entry = f"{MARKER_KEY}={marker}".encode()
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    found = []
    for path in proc.iterdir():
        if not path.name.isdigit() or int(path.name) == os.getpid():
            continue
        try:
            environ = (path / "environ").read_bytes()
        except OSError:
            continue
        if entry in environ.split(b"\0") and pid_alive(int(path.name)):
            found.append(int(path.name))
    return sorted(found)


def stop_marked(marker: str) -> list[int]:
    """SIGTERM, then SIGKILL, every process whose environment carries ``marker``; the PIDs still alive."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        pids = pids_with_marker(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not wait_gone(pids, grace) and not pids_with_marker(marker):
            return []
    return pids_with_marker(marker)


def _carries_other_environment(pid: int, entry: bytes, attempts: int = 5) -> bool:
    """Whether ``pid``'s environment is readable and lacks ``entry`` (a PID reused by another process).

    A process that is being created or exec'ed can briefly refuse the read; it is retried a few times
    before the PID counts as unknown (not another process's).
    """
    for attempt in range(attempts):
        try:
            return entry not in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            if not pid_alive(pid):
                return True
            time.sleep(0.1 * (attempt + 1))
    return False


def signal_group(pgid: int, sig: int) -> None:
    """``sig`` to process group ``pgid``; nothing if it is gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[int]:
    """Live PIDs in process group ``pgid`` (Linux: from /proc; elsewhere: [pgid])."""
    if not Path("/proc").is_dir():
        return [pgid] if pid_alive(pgid) else []
    members = []
    for path in Path("/proc").iterdir():
        if path.name.isdigit():
            try:
                fields = (path / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(path.name))
    return members


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for ``pids`` to end; those still alive."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if pid_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if pid_alive(p)]
    return left


@dataclass
class Managed:
    """One process the deployment started, in its own session (process group = its PID)."""

    name: str
    command: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ProcessSupervisor:
    """Starts processes in sessions of their own, marked; stops every one of them, by PID.

    ``grace_s``: seconds between SIGTERM and SIGKILL when stopping. ``say``
    receives one line per event worth telling.
    """

    grace_s: float = 10.0
    say: Callable[[str], None] = lambda text: None
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_pids: list[int] = field(default_factory=list)
    seen_pids: set[int] = field(default_factory=set)
    children: list[subprocess.Popen[Any]] = field(default_factory=list)
    stopped: bool = False

    def marked(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` plus this supervisor's marker."""
        return {**env, MARKER_KEY: self.marker}

    def spawn(self, name: str, command: list[str], cwd: Path, env: Mapping[str, str], log_path: Path) -> Managed:
        """Start ``command`` in a new session, its output appended to ``log_path``."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                command,
                cwd=cwd,
                env=self.marked(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: its children go with it
            )
        self.started_pids.append(popen.pid)
        self.seen_pids.add(popen.pid)
        self.children.append(popen)
        return Managed(name, command, log_path, popen)

    def adopt(self, popen: subprocess.Popen[Any]) -> None:
        """Stop ``popen`` (started elsewhere, in a session of its own) with the rest."""
        self.seen_pids.add(popen.pid)
        self.children.append(popen)

    def _running_children(self) -> list[subprocess.Popen[Any]]:
        """Direct children not yet reaped: their PIDs (= process group ids) cannot have been reused."""
        return [p for p in self.children if p.poll() is None]

    def live(self) -> list[int]:
        """Every live process: marked processes and the groups of running children."""
        live = set(pids_with_marker(self.marker))
        for child in self._running_children():
            live.update(group_members(child.pid) or [child.pid])
        self.seen_pids.update(live)
        return sorted(live)

    def _send(self, sig: int) -> None:
        """``sig`` to each running child's process group and to each marked process, by PID."""
        for child in self._running_children():
            signal_group(child.pid, sig)
        for pid in pids_with_marker(self.marker):  # e.g. the SuperLink's SuperExec, in a session of its own
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self) -> list[int]:
        """Stop every process (SIGTERM, then SIGKILL after ``grace_s``); the PIDs that were stopped.

        Idempotent. SIGINT/SIGTERM/SIGHUP are held back while it runs (main thread).
        """
        if self.stopped:
            return []
        self.stopped = True
        masked = threading.current_thread() is threading.main_thread()
        if masked:
            signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING_SIGNALS)
        try:
            return self._stop()
        finally:
            if masked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINATING_SIGNALS)

    def _stop(self) -> list[int]:
        stopped: set[int] = set()
        for sig, wait_s in ((signal.SIGTERM, self.grace_s), (signal.SIGKILL, 5.0)):
            targets = self.live()
            if not targets:
                break
            stopped.update(targets)
            self._send(sig)
            deadline = time.monotonic() + wait_s
            while self.live() and time.monotonic() < deadline:
                time.sleep(0.2)
        for child in self.children:
            try:
                child.wait(1.0)  # reap
            except subprocess.TimeoutExpired:
                pass
        left = self.live()
        self.say(f"Stopped {len(stopped)} processes (PIDs {sorted(stopped)})" + (f"; STILL RUNNING: {left}" if left else ""))
        return sorted(stopped)

    def leftovers(self) -> list[int]:
        """PIDs started or seen that still run (and still carry the marker, where readable)."""
        entry = f"{MARKER_KEY}={self.marker}".encode()
        left = []
        for pid in sorted(self.seen_pids | set(pids_with_marker(self.marker))):
            if not pid_alive(pid):
                continue
            if _carries_other_environment(pid, entry):
                continue  # the PID was reused by an unrelated process
            left.append(pid)
        return left
