"""The package's layers point down (DESIGN.md, "Architecture"): every import in the tree, at
the top of a module or inside a function, read from the source with ast, goes to the same
layer or one below; and stage 2 (train/) never imports stage 1 (extract/), nor the other way.

    0 ground floor: config, errors, metrics, loss_kinds, checkpoints, untrusted, pairs_file
    1 store/    2 extract/, train/    3 report/    4 experiments/
    5 the rest: scorer, predict, pairs, preference, recalibrate, export, demo, precheck, cli...

The version string of the package face (`from .. import __version__`) is the one import up."""
import ast
from pathlib import Path

import qamro_pipe

ROOT = Path(qamro_pipe.__file__).parent
GROUND = {"config", "errors", "metrics", "loss_kinds", "checkpoints", "untrusted", "pairs_file"}
FLOORS = {"store": 1, "extract": 2, "train": 2, "report": 3, "experiments": 4}


def _floor(parts: list[str]) -> int:
    if len(parts) < 2:
        return 5  # the package face
    return 0 if parts[1] in GROUND else FLOORS.get(parts[1], 5)


def _imports(path: Path):
    """(this module's dotted parts, each imported qamro_pipe module's parts)."""
    mod = ["qamro_pipe", *path.relative_to(ROOT).with_suffix("").parts]
    pkg = mod[:-1]
    if mod[-1] == "__init__":
        mod = pkg
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[0] != "qamro_pipe":
                continue
            if node.module is None or (node.level and not node.module):
                for a in node.names:
                    yield mod, target + [a.name]
            else:
                yield mod, target
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "qamro_pipe":
                    yield mod, a.name.split(".")


def test_imports_point_down():
    up, across = [], []
    for path in sorted(ROOT.rglob("*.py")):
        for mod, target in _imports(path):
            if target == ["qamro_pipe", "__version__"]:
                continue
            same = mod[1:2] == target[1:2]
            if not same and _floor(target) > _floor(mod):
                up.append(f"{'.'.join(mod)} -> {'.'.join(target)}")
            if not same and {mod[1:2][0] if len(mod) > 1 else "",
                             target[1:2][0] if len(target) > 1 else ""} == {"train", "extract"}:
                across.append(f"{'.'.join(mod)} -> {'.'.join(target)}")
    assert not up, "imports pointing up:\n" + "\n".join(up)
    assert not across, "stage 1 and stage 2 import each other:\n" + "\n".join(across)
    assert len(list(ROOT.rglob("*.py"))) > 50  # the walk found the package
