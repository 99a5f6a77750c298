"""Layering rules read from the source (ast): a method never imports another method, a stage never another stage."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Shared infrastructure of pipeline/methods/, not methods: every other module there is a method.
METHOD_INFRA = {"__init__", "base", "common", "discriminator"}


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved against `package`)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)   # `from pkg import module`
    return out


def sibling_imports(directory: Path, package: str, skip: set[str]) -> dict[str, set[str]]:
    """For each module of `directory` not in `skip`: the other such modules of the package it imports."""
    modules = {p.stem for p in directory.glob("*.py")} - skip
    found = {}
    for name in sorted(modules):
        imported = imported_modules(directory / f"{name}.py", package)
        found[name] = {m for m in modules - {name} if f"{package}.{m}" in imported}
    return found


def test_the_import_parser_sees_every_import_form(tmp_path):
    pkg = tmp_path / "methods"
    pkg.mkdir()
    (pkg / "a.py").write_text("import x.b\nfrom x.c import thing\nfrom . import d\nfrom .e import f\n"
                              "def late():\n    from x import g\n")
    for name in "bcdefg":
        (pkg / f"{name}.py").write_text("")
    assert sibling_imports(pkg, "x", set())["a"] == set("bcdeg")


def test_method_modules_import_no_other_method_module():
    methods = ROOT / "pipeline" / "methods"
    assert {"perflow", "ota", "flowsteer", "scflow", "ayf"} <= {p.stem for p in methods.glob("*.py")} - METHOD_INFRA
    bad = {m: sorted(imp) for m, imp in sibling_imports(methods, "pipeline.methods", METHOD_INFRA).items() if imp}
    assert not bad, f"method modules importing other method modules (move shared code to common.py): {bad}"


@pytest.mark.parametrize("infra", sorted(METHOD_INFRA - {"__init__"}))
def test_method_infrastructure_imports_no_method_module(infra):
    methods = ROOT / "pipeline" / "methods"
    method_modules = {p.stem for p in methods.glob("*.py")} - METHOD_INFRA
    imported = imported_modules(methods / f"{infra}.py", "pipeline.methods")
    assert not {m for m in method_modules if f"pipeline.methods.{m}" in imported}


def test_stages_import_no_other_stage():
    bad = {m: sorted(imp) for m, imp in sibling_imports(ROOT / "stages", "stages", {"__init__"}).items() if imp}
    assert not bad, f"stages importing other stages: {bad}"
