"""The import graph of the package against the layers README.md writes down (section Layout)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tensormask_ray"


def _rules() -> tuple[dict[str, int], set[tuple[str, str]]]:
    text = (REPO / "README.md").read_text()
    layers = {
        name: int(n)
        for n, names in re.findall(r"^layer (\d+)\s+(.+)$", text, re.M)
        for name in names.split()
    }
    exceptions = set(re.findall(r"^exception\s+(\w+) -> (\w+)\s", text, re.M))
    return layers, exceptions


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: its package under tensormask_ray (or top-level
    module), "commands" for any cli.py / *_cli.py and for the package's own __init__ (which
    re-exports the API); "root" for `tensormask_ray` itself as imported (its __version__)."""
    parts = module.split(".")[1:]
    if parts and (parts[-1] == "cli" or parts[-1].endswith("_cli") or parts == ["__init__"]):
        return "commands"
    if not parts or parts[0] == "__version__":
        return "root"
    return "ops" if parts[0] == "_C" else parts[0]


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported tensormask_ray module, line) for every import in the file."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [
            (n, node.lineno)
            for n in names
            if n == "tensormask_ray" or n.startswith("tensormask_ray.")
        ]
    return found


def test_every_import_goes_up_the_layers_readme_lists():
    layers, exceptions = _rules()
    layers.update(root=0)
    assert layers["commands"] == max(layers.values())
    units = {
        p.name.removesuffix(".py")
        for p in PACKAGE.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    units -= {"__init__"}
    assert units - set(layers) == set(), (
        "README's layers must name every package and top-level module"
    )
    wrong, used = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _unit(".".join(path.relative_to(REPO).with_suffix("").parts))
        for target, line in _imports(path):
            to = _unit(target)
            if to == source or layers[to] <= layers[source]:
                continue
            if (source, to) in exceptions:
                used.add((source, to))
                continue
            wrong.append(
                f"{path.relative_to(REPO)}:{line} ({source}, layer {layers[source]}) imports {target} (layer {layers[to]})"
            )
    assert not wrong, "imports against the layers in README.md:\n" + "\n".join(wrong)
    assert exceptions <= used, (
        f"exceptions README lists that no import needs any more: {exceptions - used}"
    )
