"""The code's shape holds: no import cycles between moekit's modules (lazy imports inside functions count too,
type-only imports under TYPE_CHECKING do not), and importing moekit installs no process-wide module hooks."""

import ast
import subprocess
import sys
from pathlib import Path

import moekit

PACKAGE = Path(moekit.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The moekit modules a file imports (a package import counts as its __init__)."""
    tree, found = ast.parse(path.read_text()), set()
    type_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules}


def test_no_import_cycles():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(files)) - {name} for name, path in files.items()}
    # a package's __init__ re-exporting its modules is not a cycle with them; a module importing its own
    # package's __init__ while that __init__ imports the module is
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_import_installs_no_global_module_hooks():
    code = (
        "import torch.nn.modules.module as m; import moekit, moekit.infer.fast; "
        "print(len(m._global_parameter_registration_hooks) + len(m._global_buffer_registration_hooks) + "
        "len(m._global_module_registration_hooks) + len(m._global_forward_hooks) + len(m._global_forward_pre_hooks))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"
