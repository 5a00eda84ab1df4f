"""The documentation cannot rot: its examples run, its claims match the code, and the
site builds strictly.

- Every ```python block of README.md and of every page under docs/ is executed, in
  order, one namespace per page (so a page reads as one script).
- Every ```bash block is checked line by line: a `parassm ...` command must pass the
  command's own parsing and checks (which need no JAX), and other commands must name
  files, modules and extras that exist. With `-m slow`, every documented `parassm`
  command also runs, with `--T` and `--budget` bounded.
- Every ```json block is the output of a command, with `//` comments; its keys must be
  exactly the keys the command writes.
- Every `!!! example` block in the docstrings of the public API runs, with a prelude
  (see `DOCSTRING_PRELUDE`).
- Defaults stated in the prose (the default solver, the CLI's budgets, ...) are those
  of the code.
- `mkdocs build --strict` runs into a temporary folder when mkdocs is installed (the
  `docs` extra), and every public name must have its anchor in the built API pages.
"""

import contextlib
import importlib.util
import inspect
import io
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import parassm
import pytest
from parassm._cli import _front as front


ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = ["README.md"] + sorted(
    str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md") if "api" not in p.parts
)


def fenced(page: str, language: str) -> list[str]:
    pattern = re.compile(rf"^```{language}[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return pattern.findall((ROOT / page).read_text())


# -- ```python blocks -----------------------------------------------------------------------


@pytest.mark.parametrize("page", [p for p in PAGES if fenced(p, "python")])
def test_doc_examples_run(page):
    namespace: dict = {"__name__": f"docs_{page}"}
    # The examples are user code: run them with JAX's standard type promotion, as users
    # do (the library itself is tested under strict promotion elsewhere).
    with jax.numpy_dtype_promotion("standard"):
        for i, block in enumerate(fenced(page, "python")):
            code = compile(block, f"{page} (python block {i + 1})", "exec")
            exec(code, namespace)


def test_pages_have_examples():
    # The extraction must find the examples (a broken fence pattern would make the tests
    # above vacuous), and every page must be found.
    assert {"README.md", "docs/index.md", "docs/getting-started/model.md"} <= set(PAGES)
    assert len(fenced("docs/index.md", "python")) >= 1
    assert len(fenced("docs/getting-started/evaluate.md", "python")) >= 4
    assert len(fenced("README.md", "bash")) >= 3


def test_model_page_shows_the_model_file():
    first = fenced("docs/getting-started/model.md", "python")[0]
    assert first == (DOCS / "examples" / "model_file.py").read_text()


def test_train_gru_example_runs():
    spec = importlib.util.spec_from_file_location("train_gru", DOCS / "examples" / "train_gru.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with jax.numpy_dtype_promotion("standard"), contextlib.redirect_stdout(io.StringIO()):
        parallel, reference = module.main(steps=3, T=24)
    np.testing.assert_allclose(parallel, reference, rtol=1e-4)
    assert "train_gru.py" in (DOCS / "getting-started" / "nn.md").read_text()


# -- ```bash blocks -------------------------------------------------------------------------


def shell_commands(page: str) -> list[list[str]]:
    """The commands of a page's bash blocks, split into words (comments, `&&` chains
    and output redirections handled)."""
    commands = []
    for block in fenced(page, "bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for word in words + ["&&"]:
                if word in ("&&", ";"):
                    if command:
                        commands.append(command)
                    command = []
                elif command and command[-1] in (">", "2>", ">>"):
                    command.pop()
                else:
                    command.append(word)
    return commands


DOCUMENTED_COMMANDS = [(page, c) for page in PAGES for c in shell_commands(page)]


def _check_parassm_command(argv: list[str]) -> None:
    """The command line passes the `parassm` parser and the checks made before any
    work; raises SystemExit (with the error on stderr) otherwise."""
    parser, _ = front.make_parser()
    if "--help" in argv or "-h" in argv:
        return
    args = parser.parse_args(argv)
    try:
        front.CHECKS[args.command](args)
    except front.UsageError as e:
        raise AssertionError(f"parassm {shlex.join(argv)}: {e}") from None


@pytest.mark.parametrize(
    "page, command", DOCUMENTED_COMMANDS, ids=[shlex.join(c) for _, c in DOCUMENTED_COMMANDS]
)
def test_documented_commands_are_valid(page, command, monkeypatch):
    monkeypatch.chdir(ROOT)
    program, rest = command[0], command[1:]
    if program == "parassm":
        _check_parassm_command(rest)
    elif program == "python":
        if rest[0] == "-m":
            module = rest[1]
            assert (ROOT / module / "__main__.py").exists() or importlib.util.find_spec(module)
        else:
            assert (ROOT / rest[0]).is_file(), f"{page}: {rest[0]} does not exist"
    elif program == "pip":
        with open(ROOT / "pyproject.toml", "rb") as f:
            extras = set(tomllib.load(f)["project"]["optional-dependencies"])
        for word in rest:
            for group in re.findall(r"\[([\w,]+)\]", word):
                assert set(group.split(",")) <= extras, f"{page}: unknown extra in {word}"
    else:
        assert program in ("pytest", "mkdocs"), f"{page}: unchecked command {command}"


def _bounded(argv: list[str], tmp_path: pathlib.Path) -> list[str]:
    """`argv` with `--T` at most 512 (`--T 256` for the demo), `--budget` at most 30 s
    and `--plot` written under `tmp_path`."""
    out = list(argv)
    limit = 256 if out[0] == "demo" else 512
    for i, word in enumerate(out[:-1]):
        if word == "--T":
            out[i + 1] = str(min(int(out[i + 1]), limit))
        elif word == "--budget":
            out[i + 1] = str(min(float(out[i + 1]), 30.0))
        elif word == "--plot":
            out[i + 1] = str(tmp_path / pathlib.Path(out[i + 1]).name)
    if out[0] == "demo" and "--T" not in out:
        out += ["--T", str(limit)]
    if "--check" in out and "--budget" not in out:
        out += ["--budget", "30"]
    return out


PARASSM_COMMANDS = [
    list(c)
    for c in dict.fromkeys(tuple(c[1:]) for _, c in DOCUMENTED_COMMANDS if c[0] == "parassm")
]


@pytest.mark.slow
@pytest.mark.parametrize("argv", PARASSM_COMMANDS, ids=[shlex.join(c) for c in PARASSM_COMMANDS])
def test_documented_commands_run(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    if "--help" in argv:
        with pytest.raises(SystemExit) as info:
            front.main(argv)
        assert info.value.code == 0
        return
    assert front.main(_bounded(argv, tmp_path)) == 0
    out = capsys.readouterr().out
    if "--json" in argv:
        json.loads(out)


# -- ```json blocks -------------------------------------------------------------------------


def documented_json(page: str, index: int = 0) -> dict:
    """The `index`-th JSON block of `page`, without its `//` comments."""
    block = fenced(page, "json")[index]
    return json.loads(re.sub(r"//[^\n]*", "", block))


def assert_same_keys(documented, actual, path="") -> None:
    """The same keys at every level of the documented object; lists are compared by
    their first element, and dictionaries keyed by solver name by their entries."""
    if isinstance(documented, dict) and isinstance(actual, dict):
        if path.endswith(("predicted_steps", "costs", "steps", "params", "check")):
            entries = list(documented.values())
            for value in actual.values():
                if entries and isinstance(value, dict):
                    assert_same_keys(entries[0], value, path + "[*]")
            return
        assert set(documented) == set(actual), (
            f"{path or 'top level'}: documented {sorted(documented)}, written {sorted(actual)}"
        )
        for key in documented:
            assert_same_keys(documented[key], actual[key], f"{path}.{key}")
    elif isinstance(documented, list) and isinstance(actual, list) and documented and actual:
        assert_same_keys(documented[0], actual[0], path + "[0]")


def test_every_json_block_is_checked():
    blocks = {page: len(fenced(page, "json")) for page in PAGES if fenced(page, "json")}
    assert blocks == {"docs/cli.md": 1, "docs/diagnostics.md": 1}


def test_demo_json_is_documented(monkeypatch):
    from parassm._cli import _commands, _runner

    value = jnp.zeros((5, 2))
    ok = _runner.Outcome("DEER", "ok", "successful", 3, 5, 5, 1.0, 0.1, 0.1, 2, value)
    stopped = _runner.Outcome(
        "Picard", "stopped", "max_steps_reached", 32, 2, 5, 1.0, 3.0, 3.0, 0, value
    )
    rows = [_commands._demo_row(o, value, 0.01) for o in (ok, stopped)]
    report = _commands._demo_report(
        T=5,
        hidden=2,
        dtype="float32",
        budget_s=45.0,
        env=dict(jax_version="0", backend="cpu", device="cpu"),
        lax_scan=dict(compile_s=0.1, run_s=0.01),
        rows=rows,
        verdict="use ...",
        wall_s=1.0,
    )
    json.dumps(report)
    assert_same_keys(documented_json("docs/cli.md"), report)


def test_diagnose_json_is_documented(capsys):
    assert front.main(["diagnose", "--system", "tent", "--T", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    documented = documented_json("docs/diagnostics.md")
    report["check"] = documented["check"]  # compared with a real --check in test_cli.py
    assert_same_keys(documented, report)


# -- Docstring examples ---------------------------------------------------------------------

# What a docstring example may assume: these imports, and a small problem `f`, `s0`, `xs`.
DOCSTRING_PRELUDE = """
import equinox as eqx
import jax
import jax.numpy as jnp
import parassm

def f(s, x):
    return jnp.tanh(0.5 * s + x)

s0 = jnp.zeros(3)
xs = jnp.linspace(-1.0, 1.0, 256 * 3).reshape(256, 3)
"""


def _public_names() -> list[str]:
    sys.path.insert(0, str(DOCS))
    try:
        import _hooks  # docs/_hooks.py
    finally:
        sys.path.remove(str(DOCS))
    return [name for names in _hooks.api_pages().values() for name in names]


def _resolve(qualified: str):
    module, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module), name)


def example_blocks(doc: str) -> list[str]:
    """The ```python blocks inside the `!!! example` admonitions of a docstring."""
    lines = inspect.cleandoc(doc).splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if not line.strip().startswith("!!! example"):
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        text = textwrap.dedent("\n".join(body))
        blocks += re.findall(r"^```python[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    return blocks


def docstring_examples() -> dict[str, list[str]]:
    """Qualified name -> its examples, over the public API and its public methods."""
    found = {}
    for qualified in _public_names():
        obj = _resolve(qualified)
        docs = {qualified: inspect.getdoc(obj) or ""}
        if isinstance(obj, type):
            for name, member in vars(obj).items():
                if not name.startswith("_"):
                    docs[f"{qualified}.{name}"] = inspect.getdoc(member) or ""
        for name, doc in docs.items():
            if blocks := example_blocks(doc):
                found[name] = blocks
    return found


EXAMPLES = docstring_examples()


def test_docstring_examples_are_found():
    assert len(EXAMPLES) >= 7
    assert {"parassm.evaluate", "parassm.Sharded", "parassm.diagnose"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_docstring_examples_run(name):
    namespace: dict = {"__name__": f"docstring_{name}"}
    with jax.numpy_dtype_promotion("standard"):
        exec(compile(DOCSTRING_PRELUDE, "prelude", "exec"), namespace)
        for i, block in enumerate(EXAMPLES[name]):
            exec(compile(block, f"{name} (example {i + 1})", "exec"), namespace)


# -- Defaults stated in the prose -----------------------------------------------------------


def _text(page: str) -> str:
    return " ".join((ROOT / page).read_text().split())  # one line: phrases may wrap


def test_stated_default_solver_is_the_code_s():
    default = type(inspect.signature(parassm.evaluate).parameters["solver"].default).__name__
    assert inspect.signature(parassm.scan).parameters["solver"].default == parassm.Auto()
    assert inspect.signature(parassm.nn.ParallelRNN).parameters["solver"].default is None
    solvers = {
        name
        for name in dir(parassm)
        if isinstance(getattr(parassm, name), type)
        and issubclass(getattr(parassm, name), parassm.AbstractSolver)
    }
    name = r"`?\[?`?(?:parassm\.)?(\w+)(?:\(\))?`?\]?(?:\[[^\]]*\])?`?"
    patterns = [
        rf"solver={name}\s*by default",
        rf"{name}\s*\(the default",
        rf"the default(?: solver)?(?: of [^.;:]*?)?(?:,| is) {name}",
        rf"{name}[^.|]{{0,40}}; the default\b",
    ]
    claims = []
    for page in PAGES:
        text = _text(page)
        for pattern in patterns:
            for match in re.finditer(pattern, text):
                if match.group(1) in solvers:
                    claims.append((page, match.group(0), match.group(1)))
        # "(default: ...)": every solver named in it is meant as the default.
        for match in re.finditer(r"\(default:? [^)]*\)", text):
            for word in re.findall(r"\w+", match.group(0)):
                if word in solvers:
                    claims.append((page, match.group(0), word))
        # A table row whose cells call its solver "the default".
        for line in (ROOT / page).read_text().splitlines():
            cells = [c.strip() for c in line.split("|")[1:-1]]
            if cells and any(re.search(r"\bthe default\b", c) for c in cells[1:]):
                first = re.findall(r"\w+", cells[0])
                if first and first[0] in solvers:
                    claims.append((page, line, first[0]))
    for page, phrase, claimed in claims:
        assert claimed == default, f"{page}: {phrase!r} names {claimed}, the default is {default}"
    assert len(claims) >= 3  # the phrases are still found


def test_stated_cli_defaults_are_the_code_s():
    from parassm._cli import _runner

    _, sub = front.make_parser()
    demo_budget = int(sub["demo"].get_default("budget"))
    check_budget = int(sub["diagnose"].get_default("budget"))
    claims = [
        ("README.md", r"shares a (\d+)-second budget", demo_budget),
        ("docs/getting-started/cli.md", r"\(`--budget`, (\d+) seconds by default", demo_budget),
        ("docs/getting-started/cli.md", r"`--budget` \((\d+) seconds by default", check_budget),
        ("docs/cli.md", r"`parassm demo --budget SECONDS` \(default (\d+)\)", demo_budget),
        ("docs/cli.md", r"--check --budget SECONDS` \(default (\d+)\)", check_budget),
        ("docs/choosing.md", r"\(`--budget`, (\d+) s by default\)", demo_budget),
        ("docs/cli.md", r"chunks of (\d+) Newton iterations", _runner.CHUNK),
        ("docs/getting-started/cli.md", r"chunk of (\d+) iterations", _runner.CHUNK),
        ("docs/getting-started/cli.md", r"first (\d+) iterations", _runner.CHUNK),
    ]
    for page, pattern, value in claims:
        found = re.findall(pattern, _text(page))
        assert found, f"{page}: no {pattern!r}"
        assert {int(x) for x in found} == {value}, f"{page}: {pattern!r} says {found}, code {value}"


# -- The site -------------------------------------------------------------------------------


def test_api_pages_cover_every_public_name():
    names = set(_public_names())
    modules = ["parassm", "parassm.linear", "parassm.systems", "parassm.nn", "parassm.diagnostics"]
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in dir(module):
            obj = getattr(module, name)
            if name.startswith("_") or type(obj).__name__ == "module":
                continue
            assert f"{module_name}.{name}" in names, f"{module_name}.{name} is not documented"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None
    or importlib.util.find_spec("mkdocstrings") is None
    or importlib.util.find_spec("material") is None,
    reason="mkdocs, mkdocs-material or mkdocstrings is not installed "
    "(pip install -e '.[docs]'); the strict docs build is not checked",
)
def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, COLUMNS="100"),
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    html = "".join(p.read_text() for p in (site / "api").rglob("*.html"))
    missing = [name for name in _public_names() if f'id="{name}"' not in html]
    assert not missing, f"no API anchor for {missing}"
    cli = (site / "cli" / "index.html").read_text()
    assert "lorenz63" in cli and "Exit status" in cli  # the generated help is there
