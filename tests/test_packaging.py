"""The FAB that ``flwr run`` ships to every device holds the app's code and nothing else."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import FAB_MAX_SIZE

REPO = Path(__file__).resolve().parents[1]


def test_the_fab_holds_the_app_code_only_and_stays_far_below_the_size_limit() -> None:
    fab = build_fab_from_disk(REPO)
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    package = {p.relative_to(REPO).as_posix() for p in (REPO / "msfusion_flwr").rglob("*.py")}
    assert {"client_app.py", "server_app.py", "pyproject.toml"} | package <= names
    assert names - package - {"client_app.py", "server_app.py", "pyproject.toml", ".info/CONTENT"} == set()
    assert len(fab) < FAB_MAX_SIZE / 10, f"FAB is {len(fab):,} bytes"


SERVER_ONLY = ("dp_accounting", "scipy", "matplotlib", "pandas", "transformers", "datasets", "flwr_datasets", "ray")


def test_a_device_importing_the_clientapp_loads_no_server_or_analysis_libraries() -> None:
    """SuperExec starts a fresh ClientApp process per message: what ``client_app`` imports is paid every round."""
    probe = (
        "import sys, client_app; "
        f"print(sorted(m for m in {SERVER_ONLY!r} if m in sys.modules)); "
        "print(sorted(m for m in sys.modules if m.startswith('msfusion_flwr.server')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "[]"], result.stdout
