"""DESIGN.md's import layers: a module imports only from its own layer or layers to its left."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "glmserve"
LAYERS = ["utils", "config|types", "distributed", "kernels", "layers", "model", "loader", "engine", "serving", "cli"]
# Modules that are not a DESIGN.md package of their own, and the layer they sit in.
PLACED = {"models": "utils", "llm": "cli", "chat_cli": "cli", "__main__": "cli", "__init__": "cli", "testing": "cli",
          "nano": "cli", "bench": "cli", "finetune": "cli", "cli_lora": "cli"}
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names.split("|")}
TORCH_FREE = ["types", "config", "engine.scheduler", "engine.kv_cache", "engine.kv_planning", "engine.stop",
              "serving.parsers"]


def _layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    return RANK[PLACED.get(top, top)]


def _modules():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, ast.parse(path.read_text(encoding="utf-8"))


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_every_module_has_a_layer():
    for name, _ in _modules():
        _layer_of(name)  # raises KeyError for a package DESIGN.md does not place


def test_imports_point_left():
    violations = []
    for name, tree in _modules():
        for imported in _imports(tree):
            if imported.startswith("glmserve.") and _layer_of(imported) > _layer_of(name):
                violations.append(f"{name} imports {imported}")
    assert not violations, violations


def test_pure_python_parts_do_not_import_torch():
    for name, tree in _modules():
        if any(name == m or name.startswith(f"glmserve.{m}.") or name == f"glmserve.{m}" for m in TORCH_FREE):
            assert not any(i.split(".")[0] in ("torch", "numpy") for i in _imports(tree)), name
