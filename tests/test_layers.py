"""The layers of the house, read from the code's own imports (module-level and function-local).

From the top down: the face (`instructloop.cli`); `serving` and `training`, which never import
each other; the ground floor for model versions (the other `instructloop.*` modules); `feedback`;
the generated stubs (`instructloop.v1`). An import may run sideways within a room or down, never
up, and no set of modules may import each other in a circle, however the import is hidden
(`TYPE_CHECKING`, inside a function). Training's loop (`instructloop.training.loop`) reaches the
stages only through `instructloop.training.loop.stages`.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each part of the `instructloop` namespace lives in the repository (pyproject's package-dir).
FOLDERS = {
    "instructloop": ROOT / "instructloop",
    "instructloop.serving": ROOT / "serving",
    "instructloop.feedback": ROOT / "feedback",
    "instructloop.training": ROOT / "training",
}
FACE, SERVING, TRAINING, GROUND, FEEDBACK, STUBS = (
    "face", "serving", "training", "ground", "feedback", "stubs"
)  # fmt: skip
RANK = {FACE: 4, SERVING: 3, TRAINING: 3, GROUND: 2, FEEDBACK: 1, STUBS: 0}
LOOP = "instructloop.training.loop"
LOOP_GATEWAY = "instructloop.training.loop.stages"
# What the loop may use from training besides the gateway: the light, torch-free modules that name
# recipes and configs and the progress file a stage writes.
LOOP_MAY_USE = {
    "instructloop.training.config",
    "instructloop.training.recipes",
    "instructloop.training.progress",
}


def room(module: str) -> str:
    if module == "instructloop.cli" or module.startswith(("instructloop.cli.", "instructloop.__")):
        return FACE
    for prefix, name in (
        ("instructloop.serving", SERVING),
        ("instructloop.training", TRAINING),
        ("instructloop.feedback", FEEDBACK),
        ("instructloop.v1", STUBS),
    ):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return GROUND


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for prefix, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if (
                prefix == "instructloop"
                and parts
                and parts[0] in {"serving", "feedback", "training"}
            ):
                continue
            found.setdefault(name, path)
    return found


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """Every `instructloop.*` module this file imports, wherever the import statement sits."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("instructloop") and name != module:
                out.add(name)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {m: imports_of(p, m, known) for m, p in found.items()}


def test_every_module_imports_from_the_one_root() -> None:
    bare = []
    folders = [*FOLDERS.values(), ROOT / "benchmarks", ROOT / "tests", ROOT / "examples"]
    for path in sorted({p for f in folders for p in f.rglob("*.py")}):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            bare += [
                f"{path.relative_to(ROOT)}: {n}"
                for n in names
                if n.split(".")[0] in {"serving", "feedback", "training"}
            ]
    assert not bare, "imports that bypass the instructloop root:\n" + "\n".join(bare)


def test_no_import_runs_up_or_across(graph: dict[str, set[str]]) -> None:
    wrong = []
    for src, targets in graph.items():
        for dst in targets:
            a, b = room(src), room(dst)
            if RANK[b] > RANK[a] or {a, b} == {SERVING, TRAINING}:
                wrong.append(f"{src} ({a}) -> {dst} ({b})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_the_loop_reaches_the_stages_through_one_module(graph: dict[str, set[str]]) -> None:
    wrong = []
    for src, targets in graph.items():
        if not (src == LOOP or src.startswith(LOOP + ".")) or src == LOOP_GATEWAY:
            continue
        for dst in targets:
            inside_loop = dst == LOOP or dst.startswith(LOOP + ".")
            if (
                room(dst) == TRAINING
                and not inside_loop
                and dst not in LOOP_MAY_USE | {"instructloop.training"}
            ):
                wrong.append(f"{src} -> {dst}")
    assert not wrong, "the loop reaches past its gateway:\n" + "\n".join(sorted(wrong))


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns the components of more than one module."""
    sys.setrecursionlimit(10_000)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles(graph: dict[str, set[str]]) -> None:
    # A package's __init__ is imported with each of its modules; only named imports count here.
    circles = strongly_connected(graph)
    assert not circles, "modules that import each other in a circle: " + repr(circles)


def test_the_checker_sees_an_upward_arrow_and_a_circle() -> None:
    """The rules above can fail: a made-up graph with one arrow up and one circle trips both."""
    fake = {
        "instructloop.feedback.store": {"instructloop.registry"},
        "instructloop.serving.a": {"instructloop.serving.b"},
        "instructloop.serving.b": {"instructloop.serving.a"},
    }
    assert room("instructloop.registry") == GROUND and room("instructloop.cli.up") == FACE
    assert RANK[room("instructloop.registry")] > RANK[room("instructloop.feedback.store")]
    assert strongly_connected(fake) == [["instructloop.serving.a", "instructloop.serving.b"]]


def test_pyproject_ships_every_package() -> None:
    """A regular (non-editable) install gets exactly the packages pyproject lists."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    present = {
        ".".join([prefix, *init.parent.relative_to(folder).parts])
        for prefix, folder in FOLDERS.items()
        for init in folder.rglob("__init__.py")
        if not (
            prefix == "instructloop"
            and init.parent.relative_to(folder).parts[:1]
            and init.parent.relative_to(folder).parts[0] in {"serving", "feedback", "training"}
        )
    }
    assert listed == present, f"missing: {present - listed}, stale: {listed - present}"
