"""The package's shape: the library imports nothing of the command line, and every module
imports on its own (an import cycle fails here, whichever module a user imports first)."""
import ast
import importlib.util
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import fastddpm

APP = "fastddpm.cli"


def _modules():
    names = ["fastddpm"]
    for info in pkgutil.walk_packages(fastddpm.__path__, "fastddpm."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return sorted(names)


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_the_library_loads_no_module_of_the_command_line():
    code = ("import sys, fastddpm, fastddpm.ops, fastddpm.schedule, fastddpm.philox\n"
            "fastddpm.available_backends()\n"
            f"bad = sorted(m for m in sys.modules if m == {APP!r} or m.startswith({APP!r} + '.'))\n"
            "print(bad)\n"
            "assert not bad, bad\n")
    r = _run(code)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_walk_finds_the_library_and_the_command_line():
    names = _modules()
    assert "fastddpm.ops" in names and "fastddpm.backends.reference" in names
    assert APP in names and any(n.startswith(APP + ".") for n in names)


def test_every_module_imports():
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in _modules())
    r = _run(code)
    assert r.returncode == 0, r.stderr[-3000:]


def _top_level_imports(module):
    """The fastddpm modules ``module`` imports when it is first imported (module-level imports,
    including those under try/if; imports inside functions run later and cannot form a cycle)."""
    spec = importlib.util.find_spec(module)
    if not spec.origin.endswith(".py"):  # the compiled extension
        return set()
    tree = ast.parse(pathlib.Path(spec.origin).read_text())
    package = module if spec.submodule_search_locations else module.rpartition(".")[0]
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("fastddpm"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                if not base.startswith("fastddpm"):
                    continue
                found.add(base)
                for a in node.names:  # `from . import x` imports the submodule x
                    if importlib.util.find_spec(f"{base}.{a.name}") if _is_package(base) else False:
                        found.add(f"{base}.{a.name}")
            elif isinstance(node, (ast.Try, ast.If)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
    visit(tree.body)
    found.discard(module)
    return found


def _is_package(name):
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {d for d in _top_level_imports(m) if d in modules} for m in modules}
    # A package's __init__ being imported by its own submodules is how Python works (the parent
    # is imported first); only edges to other modules can form a cycle.
    for m, deps in graph.items():
        deps.difference_update(p for p in list(deps) if m.startswith(p + "."))
    state, cycles = {}, []

    def dfs(node, path):
        state[node] = "active"
        for dep in sorted(graph[node]):
            if state.get(dep) == "active":
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                dfs(dep, path + [dep])
        state[node] = "done"

    for m in modules:
        if m not in state:
            dfs(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# "from .cli", "from ..cli", "fastddpm.cli", "from . import cli", but not "fastddpm.clipped_step".
_CLI_IMPORT = re.compile(r"(from \.+cli\b|fastddpm\.cli\b|from \. import cli\b)")


def test_core_modules_do_not_import_the_cli_in_their_source():
    root = pathlib.Path(fastddpm.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        text = path.read_text()
        if _CLI_IMPORT.search(text):
            offenders.append(str(rel))
    assert not offenders, offenders


def test_auto_with_no_backend_lists_every_candidates_reason(monkeypatch):
    """When "auto" finds nothing, the error says why each candidate could not run."""
    from fastddpm import backends
    why = {"cpu": "its extension is missing (test)", "reference": "switched off (test)"}
    monkeypatch.setattr(backends, "status", lambda name: (False, why[name]))
    monkeypatch.setattr(backends, "_resolved", {})
    monkeypatch.setattr(backends, "_env_choice", "auto")
    import torch
    with pytest.raises(backends.BackendUnavailableError) as err:
        backends.resolve("auto", torch.device("cpu"))
    message = str(err.value)
    assert "cpu: its extension is missing (test)" in message
    assert "reference: switched off (test)" in message
