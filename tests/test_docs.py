"""The README is a front door and the docs hold together: short README, working links, every package named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_architecture import PACKAGE, module_name


REPO = PACKAGE.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_architecture_page_names_every_package_and_module():
    """docs/architecture.md names every package and every module of the server, device and engine sides."""
    text = (REPO / "docs" / "architecture.md").read_text()
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if not name or name == "__main__":
            continue
        top = name.split(".")[0]
        assert f"msfusion_flwr.{top}" in text, f"docs/architecture.md does not name package {top}"
        if path.name != "__init__.py" and top in ("engine", "server", "device", "data", "models"):
            assert path.name in text, f"docs/architecture.md does not name {name}"


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_relative_links_resolve(page: Path):
    """Every relative link and image of the README and docs/ points to a file or folder that exists."""
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if "://" in target or target.startswith("#"):
            continue
        assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: broken link {target}"


def test_readme_is_a_front_door():
    """The README stays short (under 12 KB) and starts with the two commands that set up and run."""
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) < 12_000
    blocks = re.findall(r"```bash\n(.*?)\n```", text, re.S)[:2]
    assert blocks[0].startswith("bash scripts/setup.sh && ") and "flwr run ." in blocks[0]
    assert blocks[1] == "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
