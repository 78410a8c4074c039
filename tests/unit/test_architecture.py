"""The layers hold: import-linter's contracts (in pyproject.toml) over the whole tree, as `make lint` runs them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(root)}
    )


def test_import_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("shared/ids.py", "import worker.slots", "tunequeue -> api | worker -> shared"),
        ("api/deps.py", "import worker.slots", "tunequeue -> api | worker -> shared"),
        ("worker/slots.py", "import torch", "only inside worker/training/ and worker/inference/"),
        ("tunequeue/commands/terminal.py", "import shared.ids", "speak HTTP only"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, contract):
    """The contracts can fail: one forbidden import, in a copy of the tree, is reported by name."""
    for package in ("tunequeue", "api", "worker", "shared"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / module
    target.write_text(f"{line}\n{target.read_text()}")
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    report = " ".join(result.stdout.split())  # the report wraps long contract names
    assert f"{contract} BROKEN" in report
