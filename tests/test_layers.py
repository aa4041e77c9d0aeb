"""The package's shape, checked: layers that show in the tree and stay that way.

- no import circle between dmzctl's modules, and no module imports "upwards":
  the pure core (config, implicit, render, desired, state's diff, explain, report) never imports
  host/, ops/ or cli/; host/ never imports ops/, cli/ or verify/; ops/ never imports cli/;
- libvirt is imported in host/ only, and the environment is read at no module's import;
- no module over ~400 lines, no function over ~60 (the documented ordered rule list in
  render/nft.py excepted).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dmzctl"
LONG_ON_PURPOSE = {("render/nft.py", "render_table")}  # the policy, in order, as one readable list
MAX_MODULE, MAX_FUNCTION = 400, 60

# layer -> layers it must not import
FORBIDDEN = {
    "core": ("host", "ops", "cli", "verify", "hooks"),
    "host": ("ops", "cli", "verify"),
    "ops": ("cli",),
    "verify": ("cli", "ops.guard", "ops.lifecycle"),
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """dmzctl modules this one imports (at any depth in its body), resolved."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("dmzctl"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("dmzctl"))
    known = modules()
    return {target for target in found if target in known and target != name}


def layer_of(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in ("host", "ops", "cli", "verify", "hooks"):
        return parts[1]
    return "core" if name not in ("dmzctl.render_cli", "dmzctl.state", "dmzctl") else "glue"


def test_report_is_pure_core():
    """The diagram and the report are drawn and written from data: dot and the live reads are host/ops'."""
    assert {layer_of(name) for name in modules() if name.startswith("dmzctl.report")} == {"core"}
    assert layer_of("dmzctl.host.graphviz") == "host" and layer_of("dmzctl.ops.report") == "ops"


def test_no_module_imports_upwards():
    wrong = []
    for name, path in modules().items():
        for target in imports_of(name, path):
            rest = target.removeprefix("dmzctl.")
            for forbidden in FORBIDDEN.get(layer_of(name), ()):
                if rest == forbidden or rest.startswith(forbidden + "."):
                    wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circle_at_module_level():
    """Imports at module level only: an import inside a function is a deliberate late binding."""
    graph = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        top = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
        scratch = path.with_name(f".{path.stem}.layers-scratch.py")
        try:
            scratch.write_text(ast.unparse(top))
            graph[name] = {t for t in imports_of(name, scratch) if not name.startswith(t + ".")}
        finally:
            scratch.unlink(missing_ok=True)
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not cycles, "\n".join(cycles)


def test_libvirt_only_in_host_and_no_environment_read_at_import():
    wrong = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and layer_of(name) != "host":
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if "libvirt" in names:
                    wrong.append(f"{name} imports libvirt")
        for node in tree.body:  # module level: runs at import (functions and classes only define)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for inner in ast.walk(node):
                reads = (isinstance(inner, ast.Attribute) and inner.attr in ("environ", "getenv")) or \
                        (isinstance(inner, ast.Name) and inner.id in ("environ", "getenv"))
                if reads:
                    wrong.append(f"{name} reads the environment at import: {ast.unparse(node)[:80]}")
    assert not wrong, "\n".join(wrong)


def test_modules_and_functions_stay_small():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = str(path.relative_to(PACKAGE))
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE:
            wrong.append(f"{relative}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION and (relative, node.name) not in LONG_ON_PURPOSE:
                    wrong.append(f"{relative}:{node.lineno} {node.name}: {length} lines")
    assert not wrong, "\n".join(wrong)
