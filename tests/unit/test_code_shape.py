"""The package keeps the shape its architecture promises: imports flow one way, production code
does not import the tests' reference, functions take few parameters (values are passed whole,
only custom-op schemas spell fields out) and files stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "kernel_moe"
MAX_PARAMETERS = 8
MAX_LINES = 600
# layers of the architecture, lowest first: a module may import its own layer and lower ones only
LAYERS = ["errors", "kernels", "ops", "routing", "layers", "adapters", "manager"]
LAYER_OF = {"errors": "errors", "config": "errors", "kernels": "kernels", "ops": "ops", "routing": "kernels",
            "layers": "layers", "adapters": "adapters", "manager": "manager", "report": "errors",
            "moe": "manager", "parallel": "layers"}
# decorators whose functions are exempt: op schemas, their implementations and fakes spell every
# field out, Triton kernels take their launch arguments flat
EXEMPT_DECORATORS = ("custom_op", "register_fake", "impl", "jit")


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _decorator_names(node: ast.AST) -> set[str]:
    names = set()
    for dec in getattr(node, "decorator_list", []):
        target = dec.func if isinstance(dec, ast.Call) else dec
        while isinstance(target, ast.Attribute):
            names.add(target.attr)
            target = target.value
        if isinstance(target, ast.Name):
            names.add(target.id)
    return names


def _parameter_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return len([n for n in names if n not in ("self", "cls", "ctx")])


def test_no_function_takes_more_than_eight_parameters():
    offenders = []
    for path in _sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if _decorator_names(node) & set(EXEMPT_DECORATORS):
                    continue
                if _parameter_count(node) > MAX_PARAMETERS:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not offenders, offenders


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_file_is_at_most_600_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def _imports(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kernel_moe"):
            modules.append(node.module)
        elif isinstance(node, ast.Import):
            modules += [a.name for a in node.names if a.name.startswith("kernel_moe")]
    return modules


def test_production_code_does_not_import_the_reference():
    offenders = [f"{p.relative_to(PACKAGE)} imports {m}" for p in _sources() if "reference" not in p.parts
                 for m in _imports(p) if m.startswith("kernel_moe.reference")]
    assert not offenders, offenders


def test_imports_flow_one_way():
    """kernels -> ops -> layers -> adapters -> manager: no module imports a layer above its own."""
    offenders = []
    for path in _sources():
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if top not in LAYER_OF:
            continue
        rank = LAYERS.index(LAYER_OF[top])
        for module in _imports(path):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else ""
            if target in LAYER_OF and LAYERS.index(LAYER_OF[target]) > rank:
                offenders.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not offenders, offenders
