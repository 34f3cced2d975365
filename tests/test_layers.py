"""The package's layout: no import cycle, imports only point downwards, modules stay small.

Read from the source with `ast` (nothing is imported), so an import that only type checkers
follow (under ``TYPE_CHECKING``) or one made inside a function counts like any other: a
cycle dodged by a local import is still a cycle. ARCHITECTURE.md draws the layers.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "trio_replica"

#: Rank of each room: a module may import from its own room or a lower one only.
LAYERS: dict[str, float] = {
    "errors": 0,
    "version": 0,
    "core": 1,
    # Frames between two ends (websocket, memory network): below the runtime that drives
    # them, above the wire format whose limits they share.
    "transports": 1.5,
    "runtime": 2,
    "stores": 3,
    "sim": 3,
    "ops": 4,
    # The front: what users hold (the `Node` facade, the CLI, the demo, the test kit).
    "node": 5,
    "localcluster": 5,
    "testing": 6,
    "demo": 6,
    "cli": 7,
    "__init__": 8,
    "__main__": 9,
}

#: The protocol cores (membership, broadcast, replication) may be longer than the rest.
PROTOCOL_CORES = {"core/hyparview.py", "core/plumtree.py", "core/replication.py"}
MAX_LINES = 560


def _files() -> list[Path]:
    """The package's modules; `trio_replica/transports` is a link to the repository's
    `transports/` (installed as `trio_replica.transports`), which `rglob` does not follow."""
    return sorted([*PACKAGE.rglob("*.py"), *(PACKAGE / "transports").rglob("*.py")])


def _module(path: Path) -> str:
    transports = PACKAGE / "transports"
    if path.is_relative_to(transports):
        inner = path.relative_to(transports).with_suffix("").parts
        parts = ["trio_replica", "transports", *inner]
    else:
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The trio_replica modules that `path` imports, anywhere in the file."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("trio_replica"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.startswith("trio_replica"):
                target = node.module
            else:
                continue
            found.add(target)
            # `from . import x` names a module too.
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in _files()}
    return {
        name: {t for t in _imports(path) if t in files and t != name}
        for name, path in files.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_walk_sees_imports() -> None:
    graph = _graph()
    # Guards the test itself: a walker that saw nothing would pass everything.
    assert "trio_replica.core.plumtree" in graph["trio_replica.runtime.broadcast"]
    assert "trio_replica.transports.base" in graph["trio_replica.runtime.link"]
    assert "trio_replica.errors" in graph["trio_replica.transports.wsconn"]
    assert "trio_replica.node" in graph["trio_replica.cli"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_imports_point_downwards() -> None:
    upward = []
    for module, targets in sorted(_graph().items()):
        rank = LAYERS[_room(module)]
        upward += [f"{module} -> {t}" for t in sorted(targets) if LAYERS[_room(t)] > rank]
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def test_every_room_has_a_layer() -> None:
    rooms = {_room(_module(p)) for p in _files()}
    assert rooms <= set(LAYERS), f"modules outside the layers: {sorted(rooms - set(LAYERS))}"


def test_modules_stay_small() -> None:
    long = {}
    for path in _files():
        name = _module(path).removeprefix("trio_replica.").replace(".", "/") + ".py"
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and name not in PROTOCOL_CORES:
            long[name] = lines
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_transports_install_under_the_package() -> None:
    """Issue 21: a generic top-level package named `transports` went into site-packages.
    It stays at the top of the repository, reached through a link inside the package, and
    only `trio_replica*` packages are installed."""
    link = PACKAGE / "transports"
    assert link.is_symlink() and link.resolve() == PACKAGE.parent / "transports"
    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["trio_replica*"]
    # Nothing imports the top-level name any more (it is not installed), nor logs under it.
    root = PACKAGE.parent
    for path in [*_files(), *(root / "tests").glob("*.py"), *(root / "bench").glob("*.py")]:
        text = path.read_text()
        assert "getLogger(" + '"transports' not in text, path
        tree = ast.parse(text, str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                assert node.module.split(".")[0] != "transports", f"{path}: {node.module}"
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "transports" for a in node.names), path
