"""The package's shape, checked statically: no import cycles, and the engine talks to its
runner only through the Runner protocol."""
import ast
from pathlib import Path

import parafork
from parafork.engine.runner import Runner

PACKAGE = Path(parafork.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_time_imports(path: Path) -> set[str]:
    """Modules of the package imported when `path` is imported: module-level statements only,
    not inside functions (lazy) nor under `if TYPE_CHECKING:` (annotations)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("parafork"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                if not base.startswith("parafork"):
                    continue
                for alias in node.names:  # `from . import models` imports a module
                    sub = f"{base}.{alias.name}"
                    found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file() else base)

    visit(ast.parse(path.read_text()).body)
    return found - {name}


def test_no_import_cycles_in_the_package():
    graph = {_module_name(p): _import_time_imports(p) for p in PACKAGE.rglob("*.py")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path[path.index(dep):] + [module, dep])
            if dep not in state:
                walk(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [])
    assert "parafork.engine.engine" in graph["parafork.llm"]  # the walk saw real edges


def test_the_engine_uses_only_the_runner_protocol():
    members = {n for n in dir(Runner) if not n.startswith("_")} | set(Runner.__annotations__)
    assert members == {"info", "forward", "fork", "release", "truncate", "join"}
    used = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "runner":
                used.add((path.name, node.attr))
    assert used and {attr for _, attr in used} <= members, sorted(used)


def test_sampling_params_stay_free_of_engine_code():
    text = (PACKAGE / "sampling.py").read_text()
    tree = ast.parse(text)
    runtime = _import_time_imports(PACKAGE / "sampling.py")
    assert not any(m.startswith("parafork.engine") for m in runtime)
    assert not [f.name for f in tree.body if isinstance(f, ast.FunctionDef)], "policy belongs in engine/sampler.py"
