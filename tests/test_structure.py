"""The library never imports the paper's applications (rbd_cuda.experiments and the command-line
entry points on top of it): trainers import the library, not the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

import rbd_cuda

PACKAGE = Path(rbd_cuda.__file__).parent
# `python -m rbd_cuda.<name>` entry points: they only run rbd_cuda.experiments.<name>.
ENTRY_POINTS = {"train", "reproduce", "intrinsic_dim", "data"}
APPLICATIONS = {"experiments", *ENTRY_POINTS}


def library_modules() -> list[Path]:
    return [path for path in PACKAGE.rglob("*.py")
            if path.relative_to(PACKAGE).parts[0] not in {"experiments", *(f"{e}.py" for e in ENTRY_POINTS)}]


def imported_modules(source: str, relative: Path) -> set[str]:
    """Every module the import statements of ``source`` (the file at ``relative`` in the package)
    name, as absolute dotted names."""
    package = ["rbd_cuda", *relative.parent.parts]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import train`
    return names


def application_imports(source: str, relative: Path) -> set[str]:
    return {name for name in imported_modules(source, relative)
            if name.startswith("rbd_cuda.") and name.split(".")[1] in APPLICATIONS}


def test_the_library_imports_no_application_module():
    modules = library_modules()
    assert {"ops.py", "nn.py", "distributed.py", "reference.py"} <= {p.name for p in modules}
    offenders = {f"{path.relative_to(PACKAGE)} imports {name}" for path in modules
                 for name in application_imports(path.read_text(), path.relative_to(PACKAGE))}
    assert not offenders, sorted(offenders)


def test_the_check_sees_relative_and_absolute_imports():
    where = Path("optim/rbd.py")
    assert application_imports("from ..experiments import loop", where) == {
        "rbd_cuda.experiments", "rbd_cuda.experiments.loop"}
    assert application_imports("from .. import train", where) == {"rbd_cuda.train"}
    assert application_imports("import rbd_cuda.experiments.data as d", where) == {"rbd_cuda.experiments.data"}
    assert application_imports("from .. import nn\nfrom ..ops import project\nimport torch", where) == set()
