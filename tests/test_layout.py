"""The package's shape: the version written once (pyproject.toml); the layers of shared/DESIGN.md section 3 (core
knows arrays, the doors know names and frames) with no import cycles and no door reading another's private names."""

import ast
from pathlib import Path

import tomllib

import sparsemix

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_is_pyprojects():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert sparsemix.__version__ == declared


# -- layers and import cycles --------------------------------------------------------------------------------------

PACKAGE = ROOT / "sparsemix"
# Each module's layer; a module may import its own layer and the ones below, never above (shared/DESIGN.md
# section 3: core knows arrays, the doors know names and frames). errors/checks/progress are leaves every layer
# may use.
RANK = {
    "errors": 0,
    "checks": 1,
    "progress": 1,
    "core": 2,
    "fit": 3,
    "inference": 4,
    "formula": 5,
    "lme4": 6,
    "statsmodels": 6,
    "dask": 6,
    "cli": 7,
    "plots": 7,
    "datasets": 7,
    "families": 7,
    "__main__": 8,
    "__init__": 8,
}
# The imports allowed against the layer order, each with its reason.
ALLOWED_LAZY = {
    ("lme4.lmer", "dask.fit"): "lmer() on a Dask DataFrame hands over to the Dask door (imported only then: dask "
    "is an optional extra, and importing it cost a pandas fit 8 ms)",
}
DOORS = {"lme4", "statsmodels", "dask"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module imported, names imported from it, at module level?) for the package's own imports."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module is None:  # from . import checks
                for alias in node.names:
                    found.append(((target + "." if target else "") + alias.name, [], id(node) in top))
            else:
                found.append((target, [a.name for a in node.names], id(node) in top))
        elif isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and node.level == 0):
            mods = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for m in mods:
                if m and (m == "sparsemix" or m.startswith("sparsemix.")):
                    found.append((m.removeprefix("sparsemix").lstrip("."), [], id(node) in top))
    return found


def _graph():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        for target, names, _ in _imports(path):
            # `from .pkg import module` names a module; `from .module import thing` names the module
            targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]
            edges.setdefault(name, set()).update(t for t in targets if t in modules and t != name)
    return modules, edges


def _layer(module: str) -> str:
    return module.split(".")[0]


def test_no_import_cycles():
    modules, edges = _graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if (m, t) in ALLOWED_LAZY:
                continue
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_module_imports_only_its_layer_and_below():
    modules, edges = _graph()
    assert set(_layer(m) for m in modules) <= set(RANK), sorted(set(_layer(m) for m in modules) - set(RANK))
    upward = [
        (m, t)
        for m, targets in edges.items()
        for t in targets
        if RANK[_layer(t)] > RANK[_layer(m)] and (m, t) not in ALLOWED_LAZY
    ]
    assert not upward, "imports against the layer order: " + ", ".join(f"{m} -> {t}" for m, t in sorted(upward))


def test_no_door_imports_another_doors_private_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        for target, names, _ in _imports(path):
            if _layer(target) in DOORS and _layer(target) != _layer(name):
                offenders += [f"{name} imports {target}.{n}" for n in names if n.startswith("_")]
            if (
                _layer(target) in DOORS
                and _layer(target) != _layer(name)
                and any(part.startswith("_") for part in target.split("."))
            ):
                offenders.append(f"{name} imports the private module {target}")
    assert not offenders, offenders


def test_the_core_knows_arrays_only():
    """core/ imports numpy, scipy, scikit-sparse, the standard library and errors; never pandas or patsy."""
    for path in (PACKAGE / "core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            assert not any(m.split(".")[0] in ("pandas", "patsy") for m in mods), (path.name, mods)


def test_submodules_are_not_shadowed_by_public_names():
    """`import sparsemix.x as m` must give the module, not a function that __init__ rebinds (as `lmer` was)."""
    import importlib

    for sub in [
        p
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))
        or (p.is_dir() and (p / "__init__.py").exists())
    ]:
        name = sub.stem if sub.suffix else sub.name
        module = importlib.import_module(f"sparsemix.{name}")
        attr = getattr(sparsemix, name, module)
        assert attr is module, f"sparsemix.{name} is {attr!r}, not the module sparsemix.{name}"


def test_importing_the_package_leaves_scipy_stats_and_optimize_unloaded():
    """scipy.stats (~0.34 s) and scipy.optimize (~0.13 s) were a third of `import sparsemix`, which a script fitting
    one model pays in full: the p-values and quantiles come from scipy.special, and scipy.optimize is imported where a
    fit first calls it (L-BFGS-B, glmer.nb's theta, a profile's root)."""
    import subprocess
    import sys

    code = "import sys, sparsemix; print(sorted(m for m in ('scipy.stats', 'scipy.optimize') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
