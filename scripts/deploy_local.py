"""Run the app under Flower's deployment engine on this machine: one SuperLink, N SuperNodes.

Everything runs on loopback (127.0.0.1), on free ports chosen at start, with its
own ``FLWR_HOME`` (a temporary folder unless ``--flwr-home`` is given, so
``~/.flwr`` is never touched):

1. ``flower-superlink`` (``--insecure``, or TLS with a CA and a server certificate
   for 127.0.0.1/localhost generated here with the ``openssl`` CLI);
2. N ``flower-supernode`` processes, each with its own Runtime API port and its
   own ``--node-config "partition-id=i num-partitions=N [split-ratio=b_i] [data-dir='...']"``;
3. the SuperLink connection written into ``$FLWR_HOME/config.toml``;
4. ``flwr run . <connection> --stream [--run-config ...]`` in the app folder,
   with ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` and the venv's ``bin/``
   on ``PATH``; then ``flwr ls`` for the run's final status (``flwr run --stream``
   exits 0 even when the run failed);
5. every process it started is stopped, by PID, whatever happened (``finally``,
   SIGINT/SIGTERM/SIGHUP handlers, ``atexit``): SIGTERM to each process group,
   SIGKILL after a grace period.

Each process is started in its own session (process group), so that its
children (each SuperNode's SuperExec and ClientApp processes) go with it. The
SuperLink starts its SuperExec in a *new* session, outside the SuperLink's group;
therefore every process also carries a unique environment marker
(``MSFUSION_DEPLOYMENT_ID``) and, on Linux, stopping also ends each remaining
process whose environment holds that marker, by PID.

    .venv/bin/python scripts/deploy_local.py --nodes 3 --budgets 0.25,0.5,1.0 \\
        --run-config "num-server-rounds=2 data-fraction=0.02 min-available-nodes=3"
    .venv/bin/python scripts/deploy_local.py --nodes 4 --tls --run-config conf/quick.toml

The run waits for ``min-available-nodes`` nodes (2 unless the run config says
otherwise; conf/quick.toml says 4): keep it at most ``--nodes``.

``--certs-only --cert-dir certs [--cert-san DNS:server.example]`` only writes a
CA and a SuperLink certificate, e.g. for SuperNodes on other machines.

The exit status is 0 when the run finished ``finished:completed``, 1 otherwise,
128 + signal number when interrupted. Only the standard library is used (the
Flower executables come from the venv; ``tomli_w``, a Flower dependency, only to
edit an existing ``config.toml``), so importing this module is cheap;
:class:`LocalDeployment` is the Python API the tests use.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MARKER_KEY = "MSFUSION_DEPLOYMENT_ID"
CONNECTION = "msfusion-local"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
RUN_ID = re.compile(r"Successfully started run (\d+)")
OUTPUTS = re.compile(r"Writing run outputs to (.+?)\s*$", re.MULTILINE)
TERMINATING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class DeploymentError(RuntimeError):
    """A component failed to start, or a Flower CLI call failed."""


class Interrupted(BaseException):
    """Raised by the launcher's signal handlers so that ``finally`` blocks run."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


# --------------------------------------------------------------------------- helpers


def flower_bin() -> Path:
    """The folder holding ``flwr``, ``flower-superlink`` and ``flower-supernode``."""
    for candidate in (Path(sysconfig.get_path("scripts")), REPO / ".venv" / "bin"):
        if (candidate / "flower-superlink").is_file():
            return candidate
    found = shutil.which("flower-superlink")
    if found is None:
        raise DeploymentError("flower-superlink not found: run with the project's venv (.venv/bin/python)")
    return Path(found).parent


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


def parse_budgets(text: str | None) -> tuple[float, ...]:
    """``"0.25,0.5,1.0"`` -> (0.25, 0.5, 1.0); each must be in (0, 1]."""
    if not text:
        return ()
    budgets = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"budget {item.strip()!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise ValueError(f"budget {value} must be in (0, 1]")
        budgets.append(value)
    return tuple(budgets)


def _toml_string(text: str) -> str:
    """A TOML literal for ``text`` that Flower's ``key=value`` parser reads back."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    raise ValueError(f"cannot pass {text!r} in a Flower key=value config (it holds both quote kinds)")


def node_config(partition_id: int, num_partitions: int, split_ratio: float | None, data_dir: str | None) -> str:
    """The ``--node-config`` string of one SuperNode."""
    items = [f"partition-id={partition_id}", f"num-partitions={num_partitions}"]
    if split_ratio is not None:
        items.append(f"split-ratio={float(split_ratio)!r}")
    if data_dir:
        items.append(f"data-dir={_toml_string(data_dir)}")
    return " ".join(items)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | os.PathLike):
        return json.dumps(str(value))  # a TOML basic string
    raise TypeError(f"run-config value {value!r} must be a str, int, float or bool")


def generate_certificates(cert_dir: Path, extra_sans: Sequence[str] = (), openssl: str = "openssl") -> dict[str, Path]:
    """A CA (``ca.pem``/``ca.key``) and a server certificate/key (``server.pem``/``server.key``) it signed.

    The server certificate is valid for 127.0.0.1, ::1 and localhost (the
    SuperLink's own SuperExec always connects through loopback) and for
    ``extra_sans`` (``"DNS:server.example"``, ``"IP:10.0.0.5"``) where SuperNodes
    on other machines reach the SuperLink.
    """
    if shutil.which(openssl) is None:
        raise DeploymentError("TLS needs the openssl command line tool")
    for san in extra_sans:
        if not re.fullmatch(r"(DNS|IP):[A-Za-z0-9.:*-]+", san):
            raise ValueError(f"subject alternative name {san!r} must look like DNS:name or IP:address")
    cert_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = cert_dir / "ca.key", cert_dir / "ca.pem"
    key, csr, cert, ext = cert_dir / "server.key", cert_dir / "server.csr", cert_dir / "server.pem", cert_dir / "server.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName={','.join(['DNS:localhost', 'IP:127.0.0.1', 'IP:::1', *extra_sans])}\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    commands = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "30",
         "-keyout", str(ca_key), "-out", str(ca_cert), "-subj", "/CN=msfusion-flwr local CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-sha256",
         "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-sha256", "-days", "30", "-in", str(csr), "-CA", str(ca_cert),
         "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert), "-extfile", str(ext)],
    ]  # fmt: skip
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise DeploymentError(f"{' '.join(command[:2])} failed: {done.stderr.strip()}")
    for private in (ca_key, key):
        private.chmod(0o600)
    return {"ca": ca_cert, "cert": cert, "key": key}


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None) -> Path:
    """Add (or replace) SuperLink connection ``name`` in ``$FLWR_HOME/config.toml``."""
    path = flwr_home / "config.toml"
    fields = {"address": address}
    if root_certificates is None:
        fields["insecure"] = True
    else:
        fields["root-certificates"] = str(root_certificates.resolve())
    if path.exists():  # someone's config: keep their connections and default
        import tomli_w  # a Flower dependency, so in the venv

        data = tomllib.loads(path.read_text())
        data.setdefault("superlink", {})[name] = fields
        path.write_text(tomli_w.dumps(data))
        return path
    lines = ["[superlink]", f"default = {json.dumps(name)}", "", f"[superlink.{name}]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in fields.items()]
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


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


# --------------------------------------------------------------------------- processes


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
class SuperNodeSpec:
    """What SuperNode ``index`` is started with."""

    index: int
    port: int
    node_config: str


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
    """

    nodes: int = 2
    budgets: Sequence[float] = ()
    tls: bool = False
    data_dir: str | os.PathLike[str] | None = None
    flwr_home: Path | None = None
    work_dir: Path | None = None
    cert_dir: Path | None = None
    app_dir: Path = REPO
    connection: str = CONNECTION
    node_threads: int | None = None
    cert_sans: Sequence[str] = ()
    grace_s: float = 10.0
    start_timeout_s: float = 90.0
    echo: TextIO | None = None

    superlink: Managed | None = field(default=None, init=False)
    supernodes: list[Managed | None] = field(default_factory=list, init=False)
    specs: list[SuperNodeSpec] = field(default_factory=list, init=False)
    superlink_port: int = field(default=0, init=False)
    certificates: dict[str, Path] = field(default_factory=dict, init=False)
    started_pids: list[int] = field(default_factory=list, init=False)
    seen_pids: set[int] = field(default_factory=set, init=False)
    marker: str = field(default_factory=lambda: uuid.uuid4().hex, init=False)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError("nodes must be >= 1")
        for budget in self.budgets:
            if not 0.0 < float(budget) <= 1.0:
                raise ValueError(f"budget {budget} must be in (0, 1]")
        self.app_dir = Path(self.app_dir).resolve()
        self.bin = flower_bin()
        self._children: list[subprocess.Popen[Any]] = []
        self._stopped = False
        self._started = False

    # ----------------------------------------------------------------- setup

    def _say(self, text: str) -> None:
        if self.echo is not None:
            print(text, file=self.echo, flush=True)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.superlink_port}"

    @property
    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",  # Flower spawns its executables by name
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
            MARKER_KEY: self.marker,
        }
        env.pop("VIRTUAL_ENV", None)
        return env

    def budget(self, index: int) -> float | None:
        return float(self.budgets[index % len(self.budgets)]) if self.budgets else None

    def _spawn(self, name: str, command: list[str], extra_env: Mapping[str, str] | None = None) -> Managed:
        log_path = self.work_dir / "logs" / f"{name}.log"  # type: ignore[operator]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                command,
                cwd=self.app_dir,  # relative output-dir / data-dir resolve against the app folder
                env={**self.env, **(extra_env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: its children go with it
            )
        self.started_pids.append(popen.pid)
        self.seen_pids.add(popen.pid)
        self._children.append(popen)
        return Managed(name, command, log_path, popen)

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
        self.superlink = self._spawn("superlink", command)
        self._say(f"SuperLink pid {self.superlink.pid} on {self.address} ({'TLS' if self.tls else 'insecure'}), log {self.superlink.log_path}\n  $ {shlex.join(command)}")
        self._wait_listening(self.superlink)

        self.specs = [
            SuperNodeSpec(i, free_port(), node_config(i, self.nodes, self.budget(i), self.data_dir))  # type: ignore[arg-type]
            for i in range(self.nodes)
        ]
        self.supernodes = [None] * self.nodes
        for spec in self.specs:
            self._start_supernode(spec)

        conf = write_connection(self.flwr_home, self.connection, self.address, self.certificates.get("ca"))
        self._say(f"Connection '{self.connection}' written to {conf}")
        if wait_for_nodes:
            self.wait_for_nodes(self.nodes)

    def _start_supernode(self, spec: SuperNodeSpec) -> Managed:
        tls_args = ["--root-certificates", str(self.certificates["ca"])] if self.tls else ["--insecure"]
        command = [
            str(self.bin / "flower-supernode"), *tls_args,
            "--superlink", self.address,
            "--host", HOST, "--port", str(spec.port),
            "--node-config", spec.node_config,
        ]  # fmt: skip
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
            for node in self.supernodes:
                if node is not None and not node.running():
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
            path.write_text("".join(f"{key} = {_toml_value(value)}\n" for key, value in run_config.items()))
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
        if not self._started or self._stopped:
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
        self.seen_pids.add(process.pid)
        self._children.append(process)

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
            self._signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(process.pid, signal.SIGKILL)
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
        members = self._group_members(node.pid) if node.running() else []
        self.seen_pids.update(members)
        if node.running():
            self._signal_group(node.pid, sig)
        try:
            node.popen.wait(wait_s)
        except subprocess.TimeoutExpired:
            self._signal_group(node.pid, signal.SIGKILL)
            node.popen.wait(5.0)
        self._wait_gone(members, 5.0)
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

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _group_members(pgid: int) -> list[int]:
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

    def _running_children(self) -> list[subprocess.Popen[Any]]:
        """Direct children not yet reaped: their PIDs (= process group ids) cannot have been reused."""
        return [p for p in self._children if p.poll() is None]

    def _live(self) -> list[int]:
        """Every live process of this deployment: marked processes and the groups of running children."""
        live = set(pids_with_marker(self.marker))
        for child in self._running_children():
            live.update(self._group_members(child.pid) or [child.pid])
        self.seen_pids.update(live)
        return sorted(live)

    def _send(self, sig: int) -> None:
        """``sig`` to each running child's process group and to each marked process, by PID."""
        for child in self._running_children():
            self._signal_group(child.pid, sig)
        for pid in pids_with_marker(self.marker):  # e.g. the SuperLink's SuperExec, in a session of its own
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _wait_gone(self, pids: Sequence[int], timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        left = [p for p in pids if pid_alive(p)]
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [p for p in left if pid_alive(p)]
        return left

    def stop(self) -> list[int]:
        """Stop every process started (SIGTERM, then SIGKILL after ``grace_s``); the PIDs that were stopped.

        Idempotent. SIGINT/SIGTERM/SIGHUP are held back while it runs (main thread).
        """
        if self._stopped or not self._started:
            return []
        self._stopped = True
        atexit.unregister(self.stop)
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
            targets = self._live()
            if not targets:
                break
            stopped.update(targets)
            self._send(sig)
            deadline = time.monotonic() + wait_s
            while self._live() and time.monotonic() < deadline:
                time.sleep(0.2)
        for child in self._children:
            try:
                child.wait(1.0)  # reap
            except subprocess.TimeoutExpired:
                pass
        left = self._live()
        self._say(f"Stopped {len(stopped)} processes (PIDs {sorted(stopped)})" + (f"; STILL RUNNING: {left}" if left else ""))
        return sorted(stopped)

    def leftovers(self) -> list[int]:
        """PIDs this deployment started or saw that still run (and still carry its marker, where readable)."""
        entry = f"{MARKER_KEY}={self.marker}".encode()
        left = []
        for pid in sorted(self.seen_pids | set(pids_with_marker(self.marker))):
            if not pid_alive(pid):
                continue
            try:
                if entry not in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"):
                    continue  # the PID was reused by an unrelated process
            except OSError:
                pass
            left.append(pid)
        return left

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Start a SuperLink and N SuperNodes on loopback, `flwr run` the app against them, stop them all.",
    )
    parser.add_argument("--nodes", type=int, default=3, help="number of SuperNodes: partition ids 0..N-1, num-partitions N (default: 3)")
    parser.add_argument("--budgets", default="", help="split-ratio per SuperNode, comma separated, cycled over the nodes (e.g. 0.25,0.5,1.0); empty: none in the node configs, the run config's apply")
    parser.add_argument("--tls", action="store_true", help="TLS with a CA and server certificate generated by openssl (default: --insecure)")
    parser.add_argument("--cert-dir", type=Path, help="where --tls writes the certificates (default: <work-dir>/certs)")
    parser.add_argument("--cert-san", action="append", default=[], help="extra subjectAltName for the server certificate (DNS:name or IP:address, repeatable), for a SuperLink other machines reach")
    parser.add_argument("--certs-only", action="store_true", help="only generate the certificates (into --cert-dir, default ./certs) and exit")
    parser.add_argument("--run-config", action="append", help="passed to `flwr run --run-config` (a .toml file or \"key=value ...\"); repeatable")
    parser.add_argument("--data-dir", help="data-dir put in every SuperNode's node config (made absolute)")
    parser.add_argument("--flwr-home", type=Path, help="FLWR_HOME for all processes and the CLI (default: <work-dir>/flwr-home, so ~/.flwr is untouched)")
    parser.add_argument("--work-dir", type=Path, help="logs, certificates, FLWR_HOME (default: a new temporary folder, kept)")
    parser.add_argument("--app", type=Path, default=REPO, help="the Flower app folder, `flwr run <app>` (default: this repository)")
    parser.add_argument("--connection", default=CONNECTION, help=f"SuperLink connection name written to config.toml (default: {CONNECTION})")
    parser.add_argument("--node-threads", type=int, help="CPU threads per SuperNode (OMP_NUM_THREADS), e.g. 1 when the nodes share few cores")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL when stopping (default: 10)")
    parser.add_argument("--timeout", type=float, default=None, help="give up on the run after this many seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        budgets = parse_budgets(args.budgets)
    except ValueError as error:
        build_parser().error(str(error))

    if args.certs_only:
        try:
            paths = generate_certificates(args.cert_dir or Path("certs"), args.cert_san)
        except (DeploymentError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        for role, path in paths.items():
            print(f"{role}: {path.resolve()}")
        return 0

    def interrupt(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    if args.nodes < 1:
        build_parser().error("--nodes must be >= 1")
    previous = {sig: signal.signal(sig, interrupt) for sig in TERMINATING_SIGNALS}
    try:
        deployment = LocalDeployment(
            nodes=args.nodes,
            budgets=budgets,
            tls=args.tls,
            data_dir=args.data_dir,
            flwr_home=args.flwr_home,
            work_dir=args.work_dir,
            cert_dir=args.cert_dir,
            app_dir=args.app,
            connection=args.connection,
            node_threads=args.node_threads,
            cert_sans=args.cert_san,
            grace_s=args.grace,
            echo=sys.stdout,
        )
        with deployment:
            print(f"Work dir {deployment.work_dir} (logs/), FLWR_HOME {deployment.flwr_home}", flush=True)
            print(f"Started PIDs {deployment.started_pids}", flush=True)
            result = deployment.run(args.run_config, timeout=args.timeout)
        print(f"Run {result.run_id}: {result.status}" + (f" ({result.details})" if result.details not in ("", "N/A") else ""))
        print(f"Run outputs: {result.output_dir if result.output_dir else 'none written'}")
        return 0 if result.ok else 1
    except Interrupted as stop:
        print(f"{stop}; all processes stopped", file=sys.stderr)
        return 128 + stop.signum
    except (DeploymentError, TimeoutError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
