"""The library (rbd_cuda) never imports the paper's applications (rbd_experiments), nor what only
applications need (argparse, tqdm): trainers import the library, not the other way round. Its
top level is the products and the subpackages, and each public name has one home."""

from __future__ import annotations

import ast
from pathlib import Path

import rbd_cuda

PACKAGE = Path(rbd_cuda.__file__).parent
FORBIDDEN = {"rbd_experiments", "argparse", "tqdm"}


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


def forbidden_imports(source: str, relative: Path) -> set[str]:
    return {name for name in imported_modules(source, relative) if name.split(".")[0] in FORBIDDEN}


def test_the_library_imports_no_application_argparse_or_tqdm():
    modules = list(PACKAGE.rglob("*.py"))
    assert {"ops.py", "nn.py", "distributed.py", "reference.py", "rbd.py"} <= {p.name for p in modules}
    offenders = {f"{path.relative_to(PACKAGE)} imports {name}" for path in modules
                 for name in forbidden_imports(path.read_text(), path.relative_to(PACKAGE))}
    assert not offenders, sorted(offenders)


def test_the_library_holds_no_application_module_or_entry_point():
    names = {p.stem for p in PACKAGE.rglob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    assert not names & {"experiments", "train", "reproduce", "intrinsic_dim", "data", "demo", "__main__"}


def test_the_check_sees_relative_and_absolute_imports():
    where = Path("optim/rbd.py")
    assert forbidden_imports("from rbd_experiments import loop", where) == {
        "rbd_experiments", "rbd_experiments.loop"}
    assert forbidden_imports("import rbd_experiments.data as d", where) == {"rbd_experiments.data"}
    assert forbidden_imports("from tqdm.auto import tqdm\nimport argparse", where) == {
        "tqdm.auto", "tqdm.auto.tqdm", "argparse"}
    assert forbidden_imports("from .. import nn\nfrom ..ops import project\nimport torch", where) == set()


def test_the_top_level_is_the_products_and_the_subpackages():
    # (SegmentPlan: the grouped products' argument, built once per layout)
    products = {"project", "expand", "expand_", "project_grouped", "expand_grouped_", "SegmentPlan"}
    subpackages = {"backends", "basis", "layout", "nn", "ops", "optim"}
    assert set(rbd_cuda.__all__) == products | subpackages
    public = {name for name in vars(rbd_cuda) if not name.startswith("_")}
    # Submodules imported anywhere in the process (distributed, reference) also appear as attributes.
    assert {name for name in public if not isinstance(getattr(rbd_cuda, name), type(rbd_cuda))} == products
    for name in products:
        assert getattr(rbd_cuda, name) is getattr(rbd_cuda.ops, name)


def test_each_name_has_one_home():
    from rbd_cuda import backends, basis, layout, ops, optim
    from rbd_cuda.optim import rbd

    homes = {ops: ["DISTRIBUTIONS", "materialize", "philox4x32", "SegmentPlan"],
             backends: ["cpu", "built_with_cuda", "stream_version", "arithmetic_version"],
             basis: ["NORMALIZATIONS", "ENTRY_VARIANCE"],
             layout: ["Fixed", "Proportional", "Compression", "Compartment", "Segment"]}
    former = {rbd_cuda: ["DISTRIBUTIONS", "materialize", "philox4x32", "cpu_isa", "cpu_isas", "cuda_kernels",
                         "built_with_cuda", "stream_version"],
              ops: ["cpu_isa", "cpu_isas", "cuda_kernels", "built_with_cuda", "stream_version"],
              backends: ["cuda"],  # one CUDA kernel generation: nothing to choose
              basis: ["DISTRIBUTIONS"],
              optim: ["NORMALIZATIONS", "Fixed", "Proportional", "Compression", "Compartment", "Segment"]}
    for module, names in homes.items():
        assert all(hasattr(module, name) for name in names), module.__name__
    for module, names in former.items():
        assert [name for name in names if hasattr(module, name)] == [], module.__name__
    assert not {"ENTRY_VARIANCE", "NORMALIZATIONS"} & set(rbd.__all__)


def test_names_a_docstring_says_come_from_a_module_are_there():
    """"a rule from ``rbd_cuda.layout``: ``Fixed(d)``, ...": each name listed after "from
    ``module``:" in a docstring of the library is an attribute of that module."""
    import importlib
    import re

    listed = re.compile(r"from ``(rbd_cuda(?:\.\w+)*)``:((?:\s*``\w+(?:\([^`]*\))?``,?)+)")
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
                for module, names in listed.findall(ast.get_docstring(node)):
                    found += [(path.name, module, name) for name in re.findall(r"``(\w+)", names)]
    missing = [entry for entry in found if not hasattr(importlib.import_module(entry[1]), entry[2])]
    assert not missing, missing
    assert ("rbd.py", "rbd_cuda.layout", "Fixed") in found  # the pattern still finds what it checks


def test_one_integer_check():
    """"An int, not a bool, a float or a string" is written once, in rbd_cuda.ops.as_int (the
    reference keeps its own plain checks, as the oracle)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name != "reference.py":
            found += [(path.name, n) for n, line in enumerate(path.read_text().splitlines(), 1)
                      if "operator.index(" in line]
    assert [name for name, _ in found] == ["ops.py"], found
