"""The layer rules of the tree (import-linter contracts in pyproject.toml) hold.

server -> engine -> kernels and never back; engine.core imports no torch; nothing in the product
imports demo/. Static (every import statement, lazy ones included) plus one runtime check that
importing the core really leaves torch unloaded (package __init__ files included).
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")


def test_import_linter_contracts_are_kept():
    run = subprocess.run([sys.executable, "-c", LINT], cwd=REPO, capture_output=True, text=True, timeout=120)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert "4 kept, 0 broken" in report, report


def test_importing_the_core_and_the_request_types_loads_no_torch():
    modules = ["engine.core." + p.stem for p in (REPO / "engine" / "core").glob("*.py") if p.stem != "__init__"]
    modules += ["engine", "engine.sampling_params", "engine.outputs"]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'triton'}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout
