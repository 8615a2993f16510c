"""The layering of the toolkit stays true: import-linter's contracts (pyproject.toml) hold on this tree and break,
naming the contract, when someone adds a forbidden import; every robopolicy module has its place in them; and no
import cycle exists anywhere, across packages included."""

import ast
import graphlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("robopolicy", "sim", "real")


def _lint_imports() -> str:
    found = Path(sys.executable).parent / "lint-imports"
    path = str(found) if found.exists() else shutil.which("lint-imports")
    if path is None:
        pytest.skip("lint-imports is not installed (the dev extra installs import-linter); run `make setup`")
    return path


def _copy_tree(dest: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _run_lint(tree: Path) -> subprocess.CompletedProcess:
    # lint-imports puts its working directory first on sys.path, so the copy is analysed, not the installed package
    return subprocess.run([_lint_imports(), "--no-cache", "--no-logo"], cwd=tree, capture_output=True, text=True,
                          timeout=120)


def _contracts() -> dict[str, dict]:
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["id"]: contract for contract in config["contracts"]}


def _broken(proc: subprocess.CompletedProcess) -> str:
    """The report's part after 'Broken contracts' (empty when every contract is kept)."""
    return proc.stdout.partition("Broken contracts")[2]


def _one_line(name: str) -> str:
    return " ".join(name.split())


def test_contracts_hold_on_this_tree(tmp_path):
    proc = _run_lint(_copy_tree(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("contract, module, line", [
    ("core-layers", "robopolicy/checkpoint.py", "from robopolicy.rl import core"),
    ("robot-side", None, "import torch"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, contract, module, line):
    _lint_imports()
    tree = _copy_tree(tmp_path)
    if module is None:  # any module of the robot side
        module = next(p for p in sorted((tree / "real" / "robot").rglob("*.py")) if p.name != "__init__.py")
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # added by test_layers\n")
    proc = _run_lint(tree)
    assert proc.returncode != 0
    assert _one_line(_contracts()[contract]["name"]) in _one_line(_broken(proc)), proc.stdout + proc.stderr


def _top_modules() -> set[str]:
    return {f"robopolicy.{p.stem}" for p in (ROOT / "robopolicy").iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}


def test_every_core_module_has_a_layer():
    layers = _contracts()["core-layers"]["layers"]
    placed = {m.strip() for layer in layers for m in layer.replace(":", "|").split("|")}
    assert placed == _top_modules(), "place each robopolicy module in the core-layers contract of pyproject.toml"


def test_the_robot_side_may_use_only_data_config_and_metrics_from_robopolicy():
    forbidden = {m for m in _contracts()["robot-side"]["forbidden_modules"] if m.startswith("robopolicy.")}
    assert forbidden == _top_modules() - {"robopolicy.data", "robopolicy.config", "robopolicy.metrics"}


# ------------------------------------------------------------------------------------------------ cycles
def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in the file (function bodies included)."""
    files = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path

    def known(name: str) -> str | None:  # the module that `name` lives in
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: climb from this module's package
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        resolved = {known(t) for t in targets} - {None, module}
        # a module importing a package it lives in (`sim.vector` -> `sim`) is Python's own order, not a cycle
        graph[module] = {t for t in resolved if not module.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return err.args[1]
    return None


def test_no_import_cycles_anywhere():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_finder_sees_a_cycle_through_a_function_body(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.low import VALUE\n")
    (package / "sub" / "low.py").write_text("import pkg  # its own ancestor: no cycle\nVALUE = 1\n")
    (package / "high.py").write_text("from .sub import VALUE\n")
    assert find_cycle(import_graph(tmp_path, ["pkg"])) is None
    (package / "sub" / "low.py").write_text("def late():\n    from .. import high\n")
    assert set(find_cycle(import_graph(tmp_path, ["pkg"])) or ()) == {"pkg.high", "pkg.sub", "pkg.sub.low"}
