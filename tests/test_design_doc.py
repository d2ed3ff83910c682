"""docs/design.md's module map is the tree, and the layers import only what their row says.

The table under "## Module map" names every module of ``src/visguard`` (``__init__.py`` files
aside) in backticks, one row per layer, with the layers it may import from. This test fails when a
module is added, moved or removed without the table, when the table names a module that does not
exist, and when a module imports (at module level) from a layer its row does not name. It also holds
the rule that no module of the runtime package imports a plugin distribution or the test fixtures,
at any depth (inside functions too).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "visguard"
DOC = ROOT / "docs" / "design.md"


def _module_map() -> dict[str, tuple[set[str], set[str]]]:
    """layer -> (its module paths, the layers it may import from)."""
    text = DOC.read_text()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[set[str], set[str]]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("layer", "---") or set(cells[0]) <= {"-"}:
            continue
        layer, modules, imports = cells
        names = set(re.findall(r"`([\w/]+\.py)`", modules))
        if layer.startswith("built-in plugins"):
            names = {f"default_plugins/{n}" for n in names}
        rows[layer.split(":")[0].strip()] = (names, {i.strip() for i in imports.split(",")})
    return rows


def _tree() -> set[str]:
    return {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if p.name != "__init__.py"}


def _layer_of(module: str, rows: dict[str, tuple[set[str], set[str]]]) -> str:
    """The layer of a dotted module name under ``visguard`` (a package counts as its folder's layer)."""
    path = module.removeprefix("visguard").lstrip(".").replace(".", "/")
    for layer, (names, _) in rows.items():
        if f"{path}.py" in names or any(n.startswith(path + "/") for n in names):
            return layer
    raise AssertionError(f"visguard.{path} is in no layer of the module map")


def _module_level_imports(tree: ast.Module) -> list[str]:
    out = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in [node, *(ast.walk(node) if isinstance(node, ast.Try | ast.If) else [])]:
            if isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
                if sub.module == "visguard":  # `from visguard import plugins, hookspecs`
                    out += [f"visguard.{a.name}" for a in sub.names]
                else:
                    out.append(sub.module)
            elif isinstance(sub, ast.Import):
                out += [a.name for a in sub.names]
    return [m for m in out if m == "visguard" or m.startswith("visguard.")]


def test_the_module_map_names_every_module_of_the_tree_and_nothing_else():
    rows = _module_map()
    assert {"core", "engine", "hosting", "integrations", "command line", "built-in plugins"} <= set(rows)
    listed = set().union(*(names for names, _ in rows.values()))
    tree = _tree()
    assert not tree - listed, f"modules missing from docs/design.md's module map: {sorted(tree - listed)}"
    assert not listed - tree, f"docs/design.md names modules that do not exist: {sorted(listed - tree)}"


def test_each_layer_imports_only_the_layers_its_row_names():
    rows = _module_map()
    wrong = []
    for layer, (names, allowed) in rows.items():
        if "everything" in allowed:
            continue
        if any(a.startswith("everything but ") for a in allowed):
            (spec,) = allowed
            allowed = set(rows) - {spec.removeprefix("everything but ")}
        for name in names:
            tree = ast.parse((PKG / name).read_text())
            for target in _module_level_imports(tree):
                if target == "visguard":  # the public API package itself
                    wrong.append(f"{name} imports the visguard package at module level")
                    continue
                target_layer = _layer_of(target, rows)
                if target_layer not in allowed:
                    wrong.append(f"{name} ({layer}) imports {target} ({target_layer})")
    assert not wrong, "\n".join(wrong)


def test_the_runtime_package_imports_no_plugin_distribution_or_test_fixture():
    plugin_packages = {p.name for p in (ROOT / "plugins").glob("*/src/*") if p.is_dir() and p.name.startswith("visguard_")}
    assert {"visguard_testing", "visguard_bench", "visguard_train", "visguard_vllm"} <= plugin_packages
    found = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.relative_to(PKG)} imports {n}" for n in names if n.split(".")[0] in plugin_packages]
    assert not found, "\n".join(found)


def test_only_the_plugin_registry_and_the_built_in_plugins_name_the_built_in_plugins():
    found = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith("default_plugins/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("visguard.default_plugins"):
                found.append(f"{rel} imports {node.module}")
    assert not found, "\n".join(found)
