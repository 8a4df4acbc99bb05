import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None and not (ROOT / ".venv/bin/ruff").exists(),
                    reason="ruff is not installed (pip install -e .[test])")
def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(ROOT / ".venv/bin/ruff")
    result = subprocess.run([ruff, "check", "src", "tests", "benchmarks", "examples"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not (ROOT.parent / "shared" / "SPEC.md").exists(),
                    reason="the project's shared specification is not beside this checkout")
def test_the_spec_shipped_in_docs_is_the_projects_current_one():
    shared = (ROOT.parent / "shared" / "SPEC.md").read_text()
    assert (ROOT / "docs" / "SPEC.md").read_text() == shared, "cp ../shared/SPEC.md docs/SPEC.md"
