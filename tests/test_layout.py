"""The house rules, read from the source (nothing is imported): no import circle among the modules
of ``mllmrec/`` and ``stages/`` (imports inside functions count too), the library never imports the
top-level ``stages`` entry points, no module over 350 lines, no function over 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mllmrec", "stages")
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict) -> str | None:
    """The module of ours that ``name`` (a module or a name inside one) belongs to, if any."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _imported(module: str, path: Path, known: dict) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_resolve(a.name, known) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.update(_resolve(f"{base}.{a.name}", known) or _resolve(base, known) for a in node.names)
    return found - {None, module}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {m: _imported(m, p, known) for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_cycle_finder_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_library_never_imports_the_stage_entry_points():
    bad = {m: sorted(t for t in targets if t.split(".")[0] == "stages")
           for m, targets in import_graph().items() if m.split(".")[0] == "mllmrec"}
    assert {m: t for m, t in bad.items() if t} == {}


def test_no_module_over_the_limit():
    long = {_rel(p): n for p in modules().values() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_over_the_limit():
    long = {}
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{_rel(path)}:{node.name}"] = n
    assert long == {}


SHARED_MODEL_MODULES = {"__init__", "base", "layers", "losses", "knn_graphs", "modalities", "static_step"}


def test_every_model_config_names_its_own_file_and_module():
    """The zoo's rule (MMRec's ``models/<name>.py`` + ``configs/model/<NAME>.yaml``): config name =
    file name = ``_target_`` module, and every file of ``mllmrec/models`` is a model or a shared piece."""
    import yaml

    configs = {p.stem: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "conf" / "model").glob("*.yaml"))}
    wrong = {name: node.get("_target_") for name, node in configs.items()
             if str(node.get("_target_")).rpartition(".")[0] != f"mllmrec.models.{name}"
             or not (ROOT / "mllmrec" / "models" / f"{name}.py").is_file()}
    assert wrong == {}
    files = {p.stem for p in (ROOT / "mllmrec" / "models").glob("*.py")}
    assert files - SHARED_MODEL_MODULES - set(configs) == set()  # no model file without its config
