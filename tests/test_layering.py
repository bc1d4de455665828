"""Issue 25, item 4: each stage owns its pieces. Imports go down the stack of stages (configuration ->
calibration -> solvers on grids / formats -> the solving stage (scheduling) -> compress -> fine-tuning ->
export -> pipeline -> callback), never up; no module imports another's private names or imports the library
inside a function; the formats layer knows only torch; only the callback and its Lightning glue import
lightning."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "obc_lightning"

# stage of every module (a package counts as one): a module imports from its own stage or below
STAGES = [
    {"checks", "precision", "grids", "formats", "models", "attention", "version"},
    {"kernels", "solvers", "calibration", "config", "packed"},
    {"selection", "reporting"},
    {"scheduling", "allocation"},
    {"compress", "batchnorm", "semi_structured"},
    {"finetune"},
    {"export"},
    {"pipeline", "trainer_glue"},
    {"callback"},
]
STAGE = {name: i for i, names in enumerate(STAGES) for name in names}
# the solver engine's internals (solvers / kernels) share helpers across their own modules
ENGINE = {"solvers", "kernels"}


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        top = rel.parts[0].removesuffix(".py")
        if top == "__init__":
            continue
        yield path, top, ast.parse(path.read_text())


def imported(tree):
    """(node, module, names, at module level) of every import of obc_lightning."""
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("obc_lightning"):
            parts = node.module.split(".")
            if len(parts) == 1:  # from obc_lightning import export
                for a in node.names:
                    yield node, f"obc_lightning.{a.name}", [], id(node) in top_level
            else:
                yield node, node.module, [a.name for a in node.names], id(node) in top_level
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("obc_lightning"):
                    yield node, a.name, [], id(node) in top_level


@pytest.mark.parametrize("path,top,tree", list(modules()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_go_down_the_stack(path, top, tree):
    assert top in STAGE, f"{path}: place the module in a stage of STAGES"
    for node, module, _names, _ in imported(tree):
        assert module != "obc_lightning", f"{path}:{node.lineno} imports the package root"
        target = module.split(".")[1]
        assert STAGE[target] <= STAGE[top], f"{path}:{node.lineno} imports {module}, a later stage"


@pytest.mark.parametrize("path,top,tree", [m for m in modules() if m[1] not in ENGINE], ids=lambda v: str(v)
                         if isinstance(v, str) else "")
def test_no_private_cross_module_imports_and_none_inside_functions(path, top, tree):
    for node, module, names, at_top in imported(tree):
        private = [n for n in names if n.startswith("_") and not n.endswith("__")]
        assert not private, f"{path}:{node.lineno} imports private {private} from {module}"
        assert at_top, f"{path}:{node.lineno} imports {module} inside a function"


STANDARD = {"__future__", "abc", "collections", "dataclasses", "typing", "math"}


def test_the_formats_layer_knows_only_torch():
    for path in sorted((ROOT / "formats").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for mod in mods:
                    known = mod.split(".")[0] in STANDARD | {"torch"} or mod == "obc_lightning.grids"
                    assert known or mod.startswith("obc_lightning.formats"), f"{path}: imports {mod}"


def test_only_the_callback_and_its_glue_import_lightning():
    for path, top, tree in modules():
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m.split(".")[0] in {"lightning", "pytorch_lightning"} for m in mods):
                assert top in {"callback", "trainer_glue"}, f"{path}:{node.lineno} imports lightning"
