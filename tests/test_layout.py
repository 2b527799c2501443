"""The package's shape, checked: imports point one way, every function of ``algorithms/`` is
used by the running code, and no recipe or loop module computes a loss of its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_rlhf"

# Lower layers never import higher ones (DESIGN.md): maths and config at the bottom, then
# the parts, then checkpoints/rollouts, the loop, the recipes, the commands and the CLI.
LAYERS = {
    "algorithms": 0, "config": 0,
    "cpu_compat": 1, "parallel": 1, "progress": 1, "data": 1,
    "models": 2,
    "checkpoint": 3, "rollout": 3, "convert": 4,
    "training": 4,
    "recipes": 5,
    "commands": 6, "memory_plan": 6, "prompt_prep": 6,
    "cli": 7, "__main__": 8, "__init__": 0,
}
# Modules whose code must not do loss arithmetic: they call algorithms/ for every loss.
NO_LOSS_MATHS = ("recipes", "training")
LOSS_MATHS = {"logsigmoid", "log_softmax", "softmax", "cross_entropy", "logsumexp", "exp", "expm1", "log1p", "square",
              "clamp", "clip", "minimum", "maximum", "vocab_parallel_cross_entropy", "sigmoid", "mse_loss"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield rel.parts[0].removesuffix(".py"), path, ast.parse(path.read_text(), str(path))


def _imported_top(node, path):
    """The top-level package names of megatron_rlhf that ``node`` imports."""
    names = []
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: inside the same package
            return []
        module = node.module or ""
        if module == "megatron_rlhf":
            names = [alias.name for alias in node.names]
        elif module.startswith("megatron_rlhf."):
            names = [module.split(".")[1]]
    elif isinstance(node, ast.Import):
        names = [alias.name.split(".")[1] for alias in node.names if alias.name.startswith("megatron_rlhf.")]
    return names


def test_imports_point_one_way():
    bad = []
    for top, path, tree in _modules():
        assert top in LAYERS, f"{path}: add megatron_rlhf/{top} to LAYERS in this test (which layer is it?)"
        for node in ast.walk(tree):
            for target in _imported_top(node, path):
                if target != top and LAYERS.get(target, 99) > LAYERS[top]:
                    bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} ({top}, layer {LAYERS[top]}) imports {target} (layer {LAYERS.get(target)})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def _algorithms_functions():
    defined = {}
    for top, path, tree in _modules():
        if top == "algorithms":
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                    defined[node.name] = (path, node)
    return defined


def _referenced_names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def test_every_algorithms_function_is_used_by_the_running_code():
    """A function of algorithms/ that only tests call is maths that does not run."""
    defined = _algorithms_functions()
    outside = set()
    for top, path, tree in _modules():
        if top != "algorithms":
            outside |= _referenced_names(tree)
    used = {name for name in defined if name in outside}
    grew = True
    while grew:  # a function used only inside algorithms/ counts when its caller is used
        grew = False
        for name, (_, node) in defined.items():
            if name in used:
                for ref in _referenced_names(node) & set(defined):
                    if ref not in used:
                        used.add(ref)
                        grew = True
    unused = sorted(f"{defined[n][0].name}:{defined[n][1].lineno} {n}" for n in set(defined) - used)
    assert not unused, "functions of algorithms/ that no running code calls: " + ", ".join(unused)


def test_recipes_and_the_loop_compute_no_loss_of_their_own():
    """Every loss of recipes/ and training/ comes from algorithms/: no tensor maths of the
    kind a loss is made of (log-sigmoid, softmax, exp, square, clamp, ...) appears there."""
    found = []
    for top, path, tree in _modules():
        if top not in NO_LOSS_MATHS:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
                if name in LOSS_MATHS:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} calls {name}()")
    assert not found, "loss arithmetic outside algorithms/:\n" + "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("import torch.nn.functional as F\ndef f(x):\n    return F.logsigmoid(x).mean()\n", "logsigmoid"),
    ("def f(x, m):\n    return (x.square() * m).sum()\n", "square"),
])
def test_the_loss_check_catches_a_loss_written_in_a_recipe(tmp_path, monkeypatch, source, expected):
    """The check above is not vacuous: a loss written into a recipe file is reported."""
    recipe = PACKAGE / "recipes" / "_planted_loss_for_test.py"
    recipe.write_text(source)
    try:
        with pytest.raises(AssertionError, match=expected):
            test_recipes_and_the_loop_compute_no_loss_of_their_own()
    finally:
        recipe.unlink()
