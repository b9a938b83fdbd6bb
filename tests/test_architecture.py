"""The package's shape, checked statically: no import cycles, and the engine talks to its
runner only through the Runner protocol."""
import ast
from pathlib import Path

import parafork
from parafork.engine.runner import HiddenStateRunner, Runner

PACKAGE = Path(parafork.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_time_imports(path: Path, inside_functions: bool = False, type_only: bool = False) -> set[str]:
    """Modules of the package imported when `path` is imported: module-level statements (with
    `inside_functions`, the lazy imports in function bodies too; with `type_only`, those under
    `if TYPE_CHECKING:` too, which annotations name)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.body if type_only else node.orelse)
                continue
            if inside_functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.With, ast.For, ast.While)):
                visit(node.body)
            elif isinstance(node, (ast.If, ast.Try)):
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


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk, as the cycle it closes."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found: list[str] = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                found.append(" -> ".join((path + [module])[(path + [module]).index(dep):] + [dep]))
            elif dep not in state:
                walk(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [])
    return found


def test_no_import_cycles_in_the_package():
    """Lazy imports inside functions count too: a cycle hidden in a function body is still a
    circle between two modules that each need the other."""
    graph = {_module_name(p): _import_time_imports(p, inside_functions=True) for p in PACKAGE.rglob("*.py")}
    assert "parafork.engine.engine" in graph["parafork.llm"]  # the walk sees real edges
    assert "parafork.export" in graph["parafork.cli"]  # and lazy ones (cli imports export in a function)
    assert _cycles(graph) == []


def test_no_import_cycles_counting_type_only_imports():
    """A circle through annotations alone (`if TYPE_CHECKING:`) still ties two modules together:
    none either (sampling.py names a thread by its shape, `ThreadView`, not the engine's Thread)."""
    graph = {_module_name(p): _import_time_imports(p, inside_functions=True, type_only=True) for p in PACKAGE.rglob("*.py")}
    assert "parafork.llm" in graph["parafork"]  # the package's lazy names, under TYPE_CHECKING, are seen
    assert _cycles(graph) == []


# The layers, bottom up: a module imports only from its own layer or below (lazy and type-only
# imports counted). The first matching prefix names a module's layer.
LAYERS = [
    ("request", ["config", "tokens", "sampling", "restore"]),
    # The engine and what it runs itself: the APAR logits rules, and the draft head's network.
    ("engine", ["engine", "rules", "draft.head"]),
    # Runners and the model files they load (safetensors, GGUF: export converts for llama.cpp).
    ("runners", ["runners", "models", "export"]),
    ("facade", ["llm"]),
    # What users run: the server, benches, CLI, demo, drivers, training and its data (the draft
    # head's training too: draft/ holds the head, an engine part, and its training, a tool).
    ("tools", ["server", "bench", "cli", "demo", "remote", "vllm", "train", "data", "draft.data", "draft.train"]),
]


def _layer(module: str) -> int:
    name = module.removeprefix("parafork.")
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def test_every_import_runs_down_the_layers():
    graph = {_module_name(p): _import_time_imports(p, inside_functions=True, type_only=True) for p in PACKAGE.rglob("*.py")}
    graph.pop("parafork")  # the package's lazy public names (LLM, SamplingParams) sit above everything
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if d != "parafork" and _layer(d) > _layer(m))
    assert upward == []
    assert _layer("parafork.engine.eagle") < _layer("parafork.runners.torch_runner") < _layer("parafork.server")


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]


def test_the_engine_uses_only_the_runner_protocol():
    members = {n for n in dir(Runner) if not n.startswith("_")} | set(Runner.__annotations__)
    assert members == {"info", "forward", "fork", "release", "truncate", "join"}
    # Runners that give hidden states (a draft head's input) add two calls, nothing else.
    members |= {n for n in dir(HiddenStateRunner) if not n.startswith("_")}
    assert members == {"info", "forward", "fork", "release", "truncate", "join", "forward_hidden", "embed_tokens"}
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


def test_the_readmes_file_walk_names_files_that_exist():
    """The README's table walks request -> thread -> block table -> runner -> restored text; every
    path it names (a cell's later names sit beside its first) is in the tree."""
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and "`parafork/" in line]
    assert len(rows) >= 12
    steps = [row.split("|")[1].strip() for row in rows]
    assert [s for s in steps if s][:6] == ["request", "fork token", "thread", "block table", "runner", "restored text"]
    for row in rows:
        names = re.findall(r"`([^`]+)`", row.split("|")[2])
        folder = (PACKAGE.parent / names[0]).parent
        for i, name in enumerate(names):
            path = PACKAGE.parent / name if i == 0 or name.startswith("parafork/") else folder / name
            assert path.exists(), f"README names {name} ({path}), which is not in the tree"
