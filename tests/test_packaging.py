"""pyproject.toml and environment.yml must list the same dependencies, and CI must run the
README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the rest of the kit runs on 3.10

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def pyproject_requirements() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_norm(r) for r in meta["dependencies"] + meta["optional-dependencies"]["test"]}


def environment_requirements() -> set[str]:
    # environment.yml's pip section: lines "      - name>=x" below "- pip:" (no yaml dependency)
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    reqs = [line.strip()[2:] for line in lines[start + 1:] if line.strip().startswith("- ")]
    return {_norm(r) for r in reqs if not r.startswith("-e")}


def test_pyproject_and_environment_list_the_same_dependencies():
    py, env = pyproject_requirements(), environment_requirements()
    assert py == env, f"only in pyproject: {py - env}; only in environment.yml: {env - py}"
    assert any(r.startswith("torch>=") for r in py)
    assert not any("+cu" in r or "==" in r for r in py), "declare ranges, never CUDA pins"


def test_environment_installs_csdkit_itself():
    assert "- -e ." in (ROOT / "environment.yml").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- test-command -->\n```bash\n(.+?)\n```\n<!-- test-command -->",
                      readme, re.S)
    assert block, "README.md must hold the test command between <!-- test-command --> markers"
    cmd = block.group(1)
    assert "pytest" in cmd and "--nbval" in cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci


def test_the_code_and_the_notebooks_are_ruff_clean():
    """The style the kit promises (pyproject's [tool.ruff]), for the package, the tests, the
    benchmarks and the notebooks' code cells alike; ruff comes with the test extra."""
    import subprocess
    import sys

    pytest.importorskip("ruff")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
