"""Layering: services depend on shared only, never on each other; shared never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_services_never_import_each_other() -> None:
    for service_dir in (ROOT / "services").iterdir():
        if not (service_dir / "__init__.py").exists():
            continue
        for path in service_dir.rglob("*.py"):
            for module in _imports(path):
                if module.startswith("services."):
                    assert module.split(".")[1] == service_dir.name, f"{path} imports {module}"


def test_shared_never_imports_services_zoo_or_aimesh() -> None:
    for path in (ROOT / "shared").rglob("*.py"):
        for module in _imports(path):
            assert not module.startswith(("services", "aimesh", "zoo")), f"{path} imports {module}"


def test_zoo_depends_on_shared_only() -> None:
    for path in (ROOT / "zoo").rglob("*.py"):
        for module in _imports(path):
            assert not module.startswith(("services", "aimesh")), f"{path} imports {module}"


def test_shared_and_the_light_services_do_not_load_torch() -> None:
    modules = [p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".") for p in (ROOT / "shared").glob("*.py")]
    modules += ["services.router.service", "services.metrics.service", "aimesh.cli", "aimesh.supervisor"]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
