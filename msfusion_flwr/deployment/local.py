"""A SuperLink and N SuperNodes on loopback, ``flwr run`` against them, every process stopped afterwards.

Everything runs on 127.0.0.1, on free ports chosen at start, with its own
``FLWR_HOME`` (a temporary folder unless given, so ``~/.flwr`` is never
touched): ``flower-superlink`` (insecure, or TLS with certificates from
:mod:`.certificates`), N ``flower-supernode`` processes each with its own
Runtime API port and node config, the connection written into
``$FLWR_HOME/config.toml`` (:mod:`.flower`), then ``flwr run . <connection>
--stream`` with ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` and the
venv's ``bin/`` on ``PATH``, and ``flwr ls`` for the run's final status
(``flwr run --stream`` exits 0 even when the run failed). The processes are
supervised by :class:`~.processes.ProcessSupervisor`.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .certificates import generate_certificates
from .flower import CONNECTION, flower_bin, flower_env, node_config, toml_value, write_connection
from .node_keys import generate_node_key
from .processes import (
    HOST,
    DeploymentError,
    Managed,
    ProcessSupervisor,
    free_port,
    group_members,
    port_open,
    signal_group,
    wait_gone,
)

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
RUN_ID = re.compile(r"Successfully started run (\d+)")
OUTPUTS = re.compile(r"Writing run outputs to (.+?)\s*$", re.MULTILINE)


@dataclass
class SuperNodeSpec:
    """What SuperNode ``index`` is started with."""

    index: int
    port: int
    node_config: str
    private_key: Path | None = None
    """With SuperNode authentication: the key it authenticates with."""


@dataclass
class RunResult:
    """What one ``flwr run`` gave: the run id, its final status, where it wrote, its log."""

    run_id: str | None
    status: str | None
    output_dir: Path | None
    log: str
    returncode: int
    wall_s: float
    details: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


@dataclass
class LocalDeployment:
    """A SuperLink and ``nodes`` SuperNodes on loopback; use as a context manager.

    >>> with LocalDeployment(nodes=3, budgets=(0.25, 0.5, 1.0)) as dep:   # doctest: +SKIP
    ...     result = dep.run({"num-server-rounds": 2, "min-available-nodes": 3})
    ...     print(result.status, result.output_dir)

    ``budgets`` (split ratios) cycle over the nodes; empty: nodes carry no
    ``split-ratio`` and the run config's ``split-ratio``/``budgets`` apply.
    ``work_dir`` (default: a new temporary folder, kept afterwards) holds the
    processes' logs, the certificates and, unless ``flwr_home`` is given, FLWR_HOME.
    ``node_threads`` caps each SuperNode's CPU threads (``OMP_NUM_THREADS``, read
    by torch in its ClientApp processes) when all nodes share one machine.

    ``auth``: SuperNode authentication (:mod:`.node_keys`; implies TLS). Every
    SuperNode gets a key pair in ``<work_dir>/keys``; the SuperLink starts with
    ``--enable-supernode-auth`` and the public keys are registered with ``flwr
    supernode register`` before the nodes start, except those of the nodes in
    ``unregistered`` (indices), which then cannot join: a rogue device.
    """

    nodes: int = 2
    budgets: Sequence[float] = ()
    tls: bool = False
    data_dir: str | os.PathLike[str] | None = None
    flwr_home: Path | None = None
    work_dir: Path | None = None
    cert_dir: Path | None = None
    app_dir: Path = field(default_factory=Path.cwd)
    connection: str = CONNECTION
    node_threads: int | None = None
    auth: bool = False
    unregistered: Sequence[int] = ()
    cert_sans: Sequence[str] = ()
    grace_s: float = 10.0
    start_timeout_s: float = 90.0
    echo: TextIO | None = None

    superlink: Managed | None = field(default=None, init=False)
    supernodes: list[Managed | None] = field(default_factory=list, init=False)
    specs: list[SuperNodeSpec] = field(default_factory=list, init=False)
    superlink_port: int = field(default=0, init=False)
    certificates: dict[str, Path] = field(default_factory=dict, init=False)
    processes: ProcessSupervisor = field(init=False)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError("nodes must be >= 1")
        for budget in self.budgets:
            if not 0.0 < float(budget) <= 1.0:
                raise ValueError(f"budget {budget} must be in (0, 1]")
        if self.unregistered and not self.auth:
            raise ValueError("unregistered SuperNodes need auth (without it every node may join)")
        if not set(self.unregistered) <= set(range(self.nodes)):
            raise ValueError(f"unregistered {list(self.unregistered)} must be node indices in 0..{self.nodes - 1}")
        self.tls = self.tls or self.auth  # Flower's SuperNode authentication requires TLS
        self.app_dir = Path(self.app_dir).resolve()
        self.bin = flower_bin()
        self.processes = ProcessSupervisor(grace_s=self.grace_s, say=self._say)
        self._started = False

    @property
    def marker(self) -> str:
        """The environment marker every process of this deployment carries."""
        return self.processes.marker

    @property
    def started_pids(self) -> list[int]:
        """PIDs of the processes this deployment started (SuperLink, SuperNodes)."""
        return self.processes.started_pids

    @property
    def seen_pids(self) -> set[int]:
        """Every PID this deployment started or saw among its processes."""
        return self.processes.seen_pids

    # ----------------------------------------------------------------- setup

    def _say(self, text: str) -> None:
        if self.echo is not None:
            print(text, file=self.echo, flush=True)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.superlink_port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of every process and CLI call: the venv's bin/ first, FLWR_HOME, the marker."""
        return self.processes.marked(flower_env(self.flwr_home, self.bin, PYTHONUNBUFFERED="1"))

    def budget(self, index: int) -> float | None:
        return float(self.budgets[index % len(self.budgets)]) if self.budgets else None

    def _spawn(self, name: str, command: list[str], extra_env: Mapping[str, str] | None = None) -> Managed:
        log_path = self.work_dir / "logs" / f"{name}.log"  # type: ignore[operator]
        # cwd: relative output-dir / data-dir resolve against the app folder
        return self.processes.spawn(name, command, self.app_dir, {**self.env, **(extra_env or {})}, log_path)

    def start(self, wait_for_nodes: bool = True) -> LocalDeployment:
        """Start the SuperLink and the SuperNodes, write the connection; wait until all nodes are online."""
        if self._started:
            return self
        self._started = True
        atexit.register(self.stop)
        try:
            self._start(wait_for_nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, wait_for_nodes: bool) -> None:
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="msfusion-deploy-"))
        self.work_dir = Path(self.work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = Path(self.flwr_home or self.work_dir / "flwr-home").resolve()
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if self.data_dir is not None:
            self.data_dir = str(Path(self.data_dir).expanduser().resolve())
        tls_args = ["--insecure"]
        if self.tls:
            self.certificates = generate_certificates(Path(self.cert_dir or self.work_dir / "certs").resolve(), self.cert_sans)
            tls_args = [
                "--ssl-ca-certfile", str(self.certificates["ca"]),
                "--ssl-certfile", str(self.certificates["cert"]),
                "--ssl-keyfile", str(self.certificates["key"]),
            ]  # fmt: skip

        self.superlink_port = free_port()
        command = [str(self.bin / "flower-superlink"), *tls_args, "--host", HOST, "--port", str(self.superlink_port)]
        command += ["--disable-runtime-dependency-installation"]
        command += ["--enable-supernode-auth"] if self.auth else []
        self.superlink = self._spawn("superlink", command)
        mode = ("TLS, SuperNode authentication" if self.auth else "TLS") if self.tls else "insecure"
        self._say(f"SuperLink pid {self.superlink.pid} on {self.address} ({mode}), log {self.superlink.log_path}\n  $ {shlex.join(command)}")
        self._wait_listening(self.superlink)
        conf = write_connection(self.flwr_home, self.connection, self.address, self.certificates.get("ca"))
        self._say(f"Connection '{self.connection}' written to {conf}")

        self.specs = [
            SuperNodeSpec(i, free_port(), node_config(i, self.nodes, self.budget(i), self.data_dir))  # type: ignore[arg-type]
            for i in range(self.nodes)
        ]
        if self.auth:
            for spec in self.specs:
                spec.private_key, public_key = generate_node_key(self.work_dir / "keys", f"supernode-{spec.index}")
                if spec.index not in self.unregistered:
                    self.register_node(public_key)
        self.supernodes = [None] * self.nodes
        for spec in self.specs:
            self._start_supernode(spec)
        if wait_for_nodes:
            self.wait_for_nodes(self.nodes - len(set(self.unregistered)))

    def _start_supernode(self, spec: SuperNodeSpec) -> Managed:
        tls_args = ["--root-certificates", str(self.certificates["ca"])] if self.tls else ["--insecure"]
        command = [
            str(self.bin / "flower-supernode"), *tls_args,
            "--superlink", self.address,
            "--host", HOST, "--port", str(spec.port),
            "--node-config", spec.node_config,
        ]  # fmt: skip
        if spec.private_key is not None:
            command += ["--auth-supernode-private-key", str(spec.private_key)]
        threads = {} if self.node_threads is None else {"OMP_NUM_THREADS": str(self.node_threads), "MKL_NUM_THREADS": str(self.node_threads)}
        node = self._spawn(f"supernode-{spec.index}", command, threads)
        self.supernodes[spec.index] = node
        self._say(f"SuperNode {spec.index} pid {node.pid}, log {node.log_path}\n  $ {shlex.join(command)}")
        return node

    def _wait_listening(self, process: Managed) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not port_open(HOST, self.superlink_port):
            if not process.running():
                raise DeploymentError(f"{process.name} exited with {process.popen.returncode}:\n{process.log_tail()}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"{process.name} not listening on {self.address} after {self.start_timeout_s:.0f} s:\n{process.log_tail()}")
            time.sleep(0.2)

    # ----------------------------------------------------------------- Flower CLI

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment's FLWR_HOME, from the app folder."""
        return subprocess.run(
            [str(self.bin / "flwr"), *args],
            cwd=self.app_dir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def register_node(self, public_key: Path) -> int:
        """Register a SuperNode's public key with the SuperLink (``flwr supernode register``); its node id."""
        done = self.flwr("supernode", "register", str(public_key), self.connection, "--format", "json")
        try:
            node_id = int(json.loads(done.stdout)["node-id"])
        except (ValueError, KeyError, TypeError):
            raise DeploymentError(f"flwr supernode register {public_key} failed:\n{done.stdout}{done.stderr}") from None
        self._say(f"Registered SuperNode key {public_key} as node id {node_id}")
        return node_id

    def online_nodes(self) -> list[int]:
        """Node ids the SuperLink reports online (``flwr supernode ls``)."""
        done = self.flwr("supernode", "ls", self.connection, "--format", "json")
        if done.returncode != 0:
            raise DeploymentError(f"flwr supernode ls failed:\n{done.stdout}{done.stderr}")
        nodes = json.loads(done.stdout).get("nodes", [])
        return [int(n["node-id"]) for n in nodes if n.get("status") == "online"]

    def wait_for_nodes(self, count: int, timeout: float | None = None) -> list[int]:
        """Block until ``count`` SuperNodes are online; their node ids."""
        deadline = time.monotonic() + (timeout or self.start_timeout_s)
        while True:
            for index, node in enumerate(self.supernodes):
                if node is not None and not node.running() and index not in self.unregistered:
                    raise DeploymentError(f"{node.name} exited with {node.popen.returncode}:\n{node.log_tail()}")
            online = self.online_nodes()
            if len(online) >= count:
                self._say(f"{len(online)} SuperNodes online: node ids {online}")
                return online
            if time.monotonic() > deadline:
                raise DeploymentError(f"only {len(online)} of {count} SuperNodes online after {timeout or self.start_timeout_s:.0f} s")
            time.sleep(1.0)

    def _run_config_args(self, run_config: str | os.PathLike[str] | Mapping[str, Any] | Sequence[str] | None) -> list[str]:
        if run_config is None:
            return []
        if isinstance(run_config, Mapping):
            path = self.work_dir / f"run-config-{time.time_ns()}.toml"  # type: ignore[operator]
            path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in run_config.items()))
            return ["--run-config", str(path)]
        items = [run_config] if isinstance(run_config, str | os.PathLike) else list(run_config)
        args = []
        for item in items:
            item = str(item)
            if item.endswith(".toml") and Path(item).expanduser().is_file():
                item = str(Path(item).expanduser().resolve())  # flwr runs from the app folder
            args += ["--run-config", item]
        return args

    def run(
        self,
        run_config: str | os.PathLike[str] | Mapping[str, Any] | Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> RunResult:
        """``flwr run . <connection> --stream`` in the app folder; its final status from ``flwr ls``.

        ``run_config``: a mapping (written to a TOML file), a ``"k=v k2='s'"``
        string or a ``.toml`` path, or a list of those (one ``--run-config`` each).
        Raises ``TimeoutError`` after ``timeout`` seconds (the CLI is stopped;
        the deployment keeps running until :meth:`stop`).
        """
        if not self._started or self.processes.stopped:
            raise DeploymentError("start() the deployment first")
        command = [str(self.bin / "flwr"), "run", ".", self.connection, "--stream"]  # cwd: the app folder
        command += self._run_config_args(run_config)
        self._say(f"$ {shlex.join(command)}")
        started = time.monotonic()
        lines: list[str] = []
        process = subprocess.Popen(
            command,
            cwd=self.app_dir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self.processes.adopt(process)

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                if self.echo is not None:
                    self.echo.write(line)
                    self.echo.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                signal_group(process.pid, signal.SIGKILL)
                process.wait()
            raise TimeoutError(f"flwr run did not finish within {timeout} s") from None
        # (on an exception from wait(), e.g. from the launcher's signal handler,
        # the CLI is still running: stop() ends it with the rest)
        reader.join(5.0)
        log = ANSI.sub("", "".join(lines))
        match = RUN_ID.search(log)
        run_id = match.group(1) if match else None
        log_name = f"flwr-run-{run_id}.log" if run_id else f"flwr-run-failed-{time.time_ns()}.log"
        (self.work_dir / "logs" / log_name).write_text(log)  # type: ignore[operator]
        outputs = OUTPUTS.findall(log)
        status, details = self.run_status(run_id) if run_id else (None, "")
        return RunResult(
            run_id=run_id,
            status=status,
            output_dir=Path(outputs[-1]) if outputs else None,
            log=log,
            returncode=returncode,
            wall_s=time.monotonic() - started,
            details=details,
        )

    def run_status(self, run_id: str, wait_s: float = 30.0) -> tuple[str | None, str]:
        """``(status, status-details)`` of ``run_id`` from ``flwr ls``, waiting up to ``wait_s`` for ``finished:*``."""
        deadline = time.monotonic() + wait_s
        status, details = None, ""
        while True:
            done = self.flwr("ls", self.connection, "--run-id", run_id, "--format", "json")
            if done.returncode == 0:
                runs = json.loads(done.stdout).get("runs", [])
                if runs:
                    status, details = runs[0].get("status"), runs[0].get("status-details", "")
                    if str(status).startswith("finished"):
                        return status, details
            if time.monotonic() > deadline:
                return status, details
            time.sleep(1.0)

    # ----------------------------------------------------------------- SuperNode faults

    def kill_supernode(self, index: int, sig: int = signal.SIGKILL, wait_s: float = 10.0) -> int:
        """Send ``sig`` to SuperNode ``index``'s process group (it and its SuperExec/ClientApps); its PID.

        SIGKILL (default) is a crash: the SuperLink keeps listing the node as
        online until its heartbeat times out (over 20 s here). SIGTERM is a
        clean stop: the node deregisters at once.
        """
        node = self.supernodes[index]
        if node is None:
            raise DeploymentError(f"SuperNode {index} is not running")
        members = group_members(node.pid) if node.running() else []
        self.seen_pids.update(members)
        if node.running():
            signal_group(node.pid, sig)
        try:
            node.popen.wait(wait_s)
        except subprocess.TimeoutExpired:
            signal_group(node.pid, signal.SIGKILL)
            node.popen.wait(5.0)
        wait_gone(members, 5.0)
        self.supernodes[index] = None
        self._say(f"SuperNode {index} pid {node.pid} stopped ({signal.Signals(sig).name})")
        return node.pid

    def restart_supernode(self, index: int, wait: bool = True) -> int | None:
        """Start SuperNode ``index`` again, same port and node config (stopped first with SIGTERM if running).

        It registers as a new node (a new node id). ``wait``: block until that
        new node id is online and return it.
        """
        if self.supernodes[index] is not None:
            self.kill_supernode(index, signal.SIGTERM)
        before = set(self.online_nodes()) if wait else set()
        self._start_supernode(self.specs[index])
        if not wait:
            return None
        deadline = time.monotonic() + self.start_timeout_s
        while not (new := set(self.online_nodes()) - before):
            node = self.supernodes[index]
            if node is None or not node.running():
                raise DeploymentError(f"SuperNode {index} exited:\n{node.log_tail() if node else ''}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"restarted SuperNode {index} not online after {self.start_timeout_s:.0f} s")
            time.sleep(0.5)
        node_id = min(new)
        self._say(f"SuperNode {index} online again as node id {node_id}")
        return node_id

    # ----------------------------------------------------------------- teardown

    def stop(self) -> list[int]:
        """Stop every process started (SIGTERM, then SIGKILL after ``grace_s``); the PIDs that were stopped.

        Idempotent. SIGINT/SIGTERM/SIGHUP are held back while it runs (main thread).
        """
        if not self._started:
            return []
        atexit.unregister(self.stop)
        return self.processes.stop()

    def leftovers(self) -> list[int]:
        """PIDs this deployment started or saw that still run (and still carry its marker, where readable)."""
        return self.processes.leftovers()

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
