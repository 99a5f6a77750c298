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


# ---------------------------------------------------------------- the whole import graph (docs/architecture.md)
PACKAGES = ("pipeline", "stages", "schemas")


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (late imports count: they run too). A
    package that imports its modules by discovery (pkgutil.iter_modules) imports each of them."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = {m for m in imported_modules(path, package) if m in files and m != name}
        if path.name == "__init__.py" and "pkgutil.iter_modules" in path.read_text():
            found |= {m for m in files if m.rpartition(".")[0] == name}
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def documented_layers() -> list[tuple[int, str]]:
    """(layer, pattern) from the ```layers block of docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("```layers\n", 1)[1].split("```", 1)[0]
    out = []
    for line in block.strip().splitlines():
        number, _name, *patterns = line.split()
        out += [(int(number), p) for p in patterns]
    return out


def layer_of(module: str, layers: list[tuple[int, str]]) -> int | None:
    """The layer of the most specific pattern that matches (`pkg.*`: the package's modules)."""
    best = None
    for number, pattern in layers:
        hit = module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1]))
        if hit and (best is None or len(pattern.rstrip("*")) > len(best[1].rstrip("*"))):
            best = (number, pattern)
    return best[0] if best else None


def test_the_graph_sees_late_imports_and_discovery():
    graph = import_graph()
    assert "pipeline.model_card" in graph["pipeline.export"]            # a late (function-level) import
    assert "pipeline.methods.perflow" in graph["pipeline.methods"]        # registry discovery
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("pipeline.metrics.frechet", documented_layers()) == 0
    assert layer_of("pipeline.metrics.fid", documented_layers()) == 4


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, f"import circles (break each by moving the shared piece down a layer): {found}"


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    layers = documented_layers()
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer_of(m, layers) is None)
    assert not unplaced, f"modules missing from docs/architecture.md's layers: {unplaced}"
    upward = sorted(f"{m} (layer {layer_of(m, layers)}) imports {i} (layer {layer_of(i, layers)})"
                    for m, imps in graph.items() for i in imps if layer_of(i, layers) > layer_of(m, layers))
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)
