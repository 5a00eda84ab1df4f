"""The shape of the package: no import cycles, a command front end that imports no JAX,
lazy top-level names that match what type checkers see, and the kernels importable by
name from a source checkout and from a wheel."""

import ast
import importlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
HEAVY = ("jax", "jaxlib", "equinox", "jaxtyping", "numpy", "matplotlib")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, level: int, package: str) -> str:
    if not level:
        return module
    base = package.split(".")
    return ".".join(base[: len(base) - level + 1] + ([module] if module else []))


def _lazy_names(path: pathlib.Path) -> dict[str, str]:
    """For a package's `__init__.py`: each name imported under `TYPE_CHECKING` (and so
    imported lazily, on first use), with the module that defines it."""
    package = _module_name(path)
    names = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom):
                    module = _resolve(stmt.module, stmt.level, package)
                    for alias in stmt.names:
                        names[alias.name] = module
    return names


def _imports(path: pathlib.Path, top_level_only: bool, lazy=None) -> set[str]:
    """The modules `path` imports, by absolute name, leaving out `if TYPE_CHECKING:`
    blocks. `from X import y` counts as an import of the module `X.y` if there is one,
    of the module that defines `y` if `X` imports it lazily (`lazy`: package -> name ->
    module), and of `X` itself unless `X` is a package around this module (always
    imported first, and lazy)."""
    lazy = lazy or {}
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = _resolve(node.module, node.level, package)
                for alias in node.names:
                    found.add(f"{module}.{alias.name}")
                    found.add(lazy.get(module, {}).get(alias.name, module))
                if module in ancestors:
                    found.discard(module)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if not top_level_only:
                    visit(node.body)
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, []))

    visit(ast.parse(path.read_text()).body)
    return found


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    files = sorted((ROOT / "parassm").rglob("*.py"))
    modules = {_module_name(p): p for p in files}
    lazy = {_module_name(p): _lazy_names(p) for p in files if p.name == "__init__.py"}
    return {
        name: {m for m in _imports(path, top_level_only, lazy) if m in modules and m != name}
        for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycles():
    # Imports inside functions count too: a cycle there is a layering mistake as well.
    assert _cycles(_graph(top_level_only=False)) == []


def test_the_command_front_end_imports_no_jax():
    graph = _graph(top_level_only=True)
    seen, todo = set(), ["parassm._cli"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += [m for m in list(graph[name]) + parents if m not in seen]
    heavy = {
        (name, m)
        for name in seen
        for m in _imports(ROOT / _path(name), top_level_only=True)
        if m.split(".")[0] in HEAVY
    }
    assert heavy == set()
    assert "parassm._cli._commands" not in seen and "parassm._cli._runner" not in seen


def _path(name: str) -> pathlib.Path:
    path = pathlib.Path(*name.split("."))
    return path / "__init__.py" if (ROOT / path).is_dir() else path.with_suffix(".py")


@pytest.mark.parametrize("package", ["parassm", "parassm.systems"])
def test_lazy_names_are_what_type_checkers_see(package):
    path = ROOT / _path(package)
    declared = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom)
                for alias in stmt.names:
                    assert alias.asname == alias.name  # a public re-export
                    declared[alias.name] = (stmt.module, stmt.level)
    module = importlib.import_module(package)
    eager = {n for n in vars(module) if not n.startswith("_")}
    public = {n for n in dir(module) if not n.startswith("_")} - {"importlib", "typing"}
    assert public - eager == set(declared) - eager
    for name, (where, level) in declared.items():
        value = getattr(module, name)
        source = importlib.import_module("." * level + (where or name), package if level else None)
        assert value is (source if where is None else getattr(source, name)), name


def test_importing_the_package_imports_no_jax():
    code = textwrap.dedent(
        """
        import sys
        import parassm, parassm.systems
        names = list(parassm.systems.SYSTEMS)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
        print(heavy, names[0])
        """
    ).format(heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "logistic"]


def test_kernels_are_a_package_of_their_own():
    import parassm_kernels

    path = pathlib.Path(parassm_kernels.__file__).resolve()
    assert path.parent.name == "parassm_kernels"
    assert callable(parassm_kernels.diagonal_scan) and parassm_kernels.MAX_BLOCK_SIZE == 32


WHEEL_CHECK = """
import pathlib, sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, jax.random as jr
import parassm, parassm_kernels
here = pathlib.Path(sys.prefix).resolve()
for module in (parassm, parassm_kernels):
    assert here in pathlib.Path(module.__file__).resolve().parents, module.__file__
a = jr.uniform(jr.key(0), (37, 3), jnp.float64, -1.0, 1.0)
b = jr.normal(jr.key(1), (37, 3), jnp.float64)
out = parassm_kernels.diagonal_scan(a, b, chunk_size=8, interpret=True)
ref = parassm_kernels.diagonal_scan_reference(a, b)
assert float(jnp.max(jnp.abs(out - ref))) < 1e-12
print("wheel ok", parassm.__version__)
"""


@pytest.mark.slow
def test_wheel_ships_the_kernels(tmp_path):
    """Build the wheel, install it (without dependencies) into a fresh virtual
    environment that sees this one's packages after its own, and run one kernel."""
    wheels = tmp_path / "wheels"
    # With hatchling installed here, build with it; otherwise pip fetches it.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("hatchling") else []
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation]
        + ["-q", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("parassm-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    # JAX and the other dependencies from this environment: a .pth line adds its
    # site-packages after the new one, without running the .pth files there (so an
    # editable install of this checkout stays out of the way).
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    pathlib.Path(site, "_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [python, "-c", WHEEL_CHECK],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("wheel ok")
    assert shutil.which("parassm", path=str(python.parent))  # the console script
    help_proc = subprocess.run(
        [python.parent / "parassm", "--help"], capture_output=True, text=True, env=env
    )
    assert help_proc.returncode == 0 and "usage: parassm" in help_proc.stdout
