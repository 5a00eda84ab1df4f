"""The documentation cannot rot: its examples run, and the site builds strictly.

- Every ```python block of the hand-written pages is executed, in order, one namespace
  per page (so a page reads as one script). Blocks in other languages (`bash`, `text`,
  `json`) are not run.
- `mkdocs build --strict` runs into a temporary folder when mkdocs is installed (the
  `docs` extra), and every public name must have its anchor in the built API pages.
"""

import importlib.util
import pathlib
import re
import subprocess
import sys

import jax
import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# The pages whose examples this test owns (docs/solvers.md and docs/diagnostics.md are
# tested by their authors).
PAGES = [
    "index.md",
    "getting-started/evaluate.md",
    "getting-started/nn.md",
    "getting-started/cli.md",
    "choosing.md",
    "theory.md",
    "faq.md",
    "benchmarks.md",
    "cli.md",
]

FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(page: str) -> list[str]:
    return FENCE.findall((DOCS / page).read_text())


@pytest.mark.parametrize("page", PAGES)
def test_doc_examples_run(page):
    path = DOCS / page
    assert path.exists(), f"docs/{page} is missing"
    namespace: dict = {"__name__": f"docs_{page}"}
    # The examples are user code: run them with JAX's standard type promotion, as users
    # do (the library itself is tested under strict promotion elsewhere).
    with jax.numpy_dtype_promotion("standard"):
        for i, block in enumerate(python_blocks(page)):
            code = compile(block, f"docs/{page} (python block {i + 1})", "exec")
            exec(code, namespace)


def test_pages_have_examples():
    # The extraction must find the examples (a broken fence pattern would make the test
    # above vacuous).
    assert len(python_blocks("index.md")) >= 1
    assert len(python_blocks("getting-started/evaluate.md")) >= 4


def _public_names() -> list[str]:
    sys.path.insert(0, str(DOCS))
    try:
        import _hooks  # docs/_hooks.py
    finally:
        sys.path.remove(str(DOCS))
    return [name for names in _hooks.api_pages().values() for name in names]


def test_api_pages_cover_every_public_name():
    import parassm

    names = set(_public_names())
    modules = ["parassm", "parassm.linear", "parassm.systems", "parassm.nn"]
    if hasattr(parassm, "diagnostics"):
        modules.append("parassm.diagnostics")
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
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    html = "".join(p.read_text() for p in (site / "api").rglob("*.html"))
    missing = [name for name in _public_names() if f'id="{name}"' not in html]
    assert not missing, f"no API anchor for {missing}"
