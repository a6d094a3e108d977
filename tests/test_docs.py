"""The documentation's code runs, and the site covers the whole public API.

Every ```python block of every page under docs/ and of README.md is executed: a page's
blocks run in order in one namespace, in a fresh Python process, so that a guide sees
what a user sees (JAX's default float32, no state left by other tests, no rule
registered by another page) and cannot rot. A block right after the line
`<!-- skip -->` is not run; keep that for what cannot run in a test (`make docs`).

Tracebacks point into the Markdown file: each block is compiled with the page's path as
its file name and its own line numbers.

Run one page by hand with `python tests/test_docs.py docs/guides/pinn.md`.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARK = "<!-- skip -->"
# Far above what any page needs (the PINN guide, the slowest, takes seconds), so that a
# hang fails the test instead of stalling the suite.
PAGE_TIMEOUT_S = 300

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\n`]*)$")


def code_blocks(text: str) -> list[tuple[int, str, bool]]:
    """`(first code line, code, skipped)` for every ```python block of `text`.

    Lines are numbered from 1. Blocks nested in lists or admonitions are found too
    (their common indentation is removed). A block is skipped when the last non-blank
    line before its opening fence is `<!-- skip -->`.
    """
    lines = text.splitlines()
    blocks: list[tuple[int, str, bool]] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        language = match["info"].strip().split(" ")[0].lstrip(".").lower()
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""
        ):
            j += 1
        if language in ("python", "py"):
            body = [line[indent:] for line in lines[i + 1 : j]]
            previous = next(
                (line.strip() for line in reversed(lines[:i]) if line.strip()), ""
            )
            blocks.append((i + 2, "\n".join(body) + "\n", previous == SKIP_MARK))
        i = j + 1
    return blocks


def run_page(path: Path) -> None:
    """Execute the page's blocks in order in one namespace (in this process)."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    for line, code, skipped in code_blocks(path.read_text(encoding="utf-8")):
        if skipped:
            continue
        # Leading newlines make the traceback's line numbers those of the Markdown.
        source = "\n" * (line - 1) + code
        exec(compile(source, str(path), "exec"), namespace)


def pages() -> list[Path]:
    found = sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)
    return [*found, ROOT / "README.md"]


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", pages(), ids=_page_id)
def test_page_code_runs(page: Path) -> None:
    if not any(not skipped for _, _, skipped in code_blocks(page.read_text())):
        pytest.skip("no Python code on this page")
    env = dict(os.environ)
    # Like a user's process: no float64 switched on by the test configuration.
    env.pop("JAX_ENABLE_X64", None)
    result = subprocess.run(
        [sys.executable, __file__, str(page)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT_S,
    )
    if result.returncode != 0:
        pytest.fail(
            f"the code of {_page_id(page)} failed:\n{result.stderr[-6000:]}",
            pytrace=False,
        )


GUIDES = sorted((DOCS / "guides").glob("*.md"))


@pytest.mark.parametrize("page", GUIDES, ids=_page_id)
def test_guides_have_code_that_runs(page: Path) -> None:
    """Each guide shows runnable code (the benchmarks page shows results instead)."""
    if page.name == "benchmarks.md":
        pytest.skip("shows the results of `make bench`")
    runnable = [b for b in code_blocks(page.read_text()) if not b[2]]
    assert runnable, f"{_page_id(page)} has no Python block that the tests run"


def test_every_public_name_has_an_api_page() -> None:
    import fwdlap

    names = sorted(set(fwdlap.__all__) - {"__version__"})
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = []
    for name in names:
        page = DOCS / "api" / f"{name}.md"
        if not page.is_file() or f"::: fwdlap.{name}" not in page.read_text():
            missing.append(f"{name} (no docs/api/{name}.md rendering ::: fwdlap.{name})")
        elif f"api/{name}.md" not in nav:
            missing.append(f"{name} (docs/api/{name}.md is not in the mkdocs.yml nav)")
    assert not missing, "public names without an API page: " + ", ".join(missing)


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [
        str(p.relative_to(DOCS))
        for p in pages()[:-1]
        if f": {p.relative_to(DOCS).as_posix()}" not in nav
        and f"- {p.relative_to(DOCS).as_posix()}" not in nav
    ]
    assert not missing, f"pages missing from the nav in mkdocs.yml: {missing}"


def test_math_assets_are_shipped() -> None:
    """KaTeX is served from the site itself: every file mkdocs.yml loads exists."""
    config = (ROOT / "mkdocs.yml").read_text()
    assets = re.findall(r"^\s*- (\S+\.(?:js|css))\s*$", config, re.MULTILINE)
    assert any("katex" in a for a in assets), assets
    for asset in assets:
        assert not re.match(r"(https?:)?//", asset), f"{asset} is loaded from the web"
        assert (DOCS / asset).is_file(), f"docs/{asset} is missing"
    css = (DOCS / "assets" / "katex" / "katex.min.css").read_text()
    fonts = set(re.findall(r"url\((fonts/[^)]+)\)", css))
    assert fonts
    absent = [f for f in fonts if not (DOCS / "assets" / "katex" / f).is_file()]
    assert not absent, f"KaTeX fonts referenced by katex.min.css but missing: {absent}"


def test_offline_check_finds_remote_assets(tmp_path: Path) -> None:
    """The build hook that fails `mkdocs build` on assets loaded from the web."""
    pytest.importorskip("mkdocs")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "docs_build_hook", DOCS / "_hooks" / "build.py"
    )
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)

    (tmp_path / "ok.html").write_text(
        '<script src="assets/katex/katex.min.js"></script>'
        '<link rel="stylesheet" href="../assets/katex/katex.min.css">'
        '<a href="https://jax.readthedocs.io">links are fine</a>'
    )
    assert hook.remote_fetches(tmp_path) == []
    (tmp_path / "bad.html").write_text(
        '<script src="https://cdn.jsdelivr.net/npm/katex/dist/katex.min.js"></script>'
    )
    (tmp_path / "bad.css").write_text("@font-face{src:url(//fonts.gstatic.com/x.woff2)}")
    found = hook.remote_fetches(tmp_path)
    assert len(found) == 2, found
    assert any("cdn.jsdelivr.net" in f for f in found)
    assert any("fonts.gstatic.com" in f for f in found)


def test_code_blocks_parser() -> None:
    text = "\n".join(
        [
            "# Title",
            "```python",
            "x = 1",
            "```",
            "<!-- skip -->",
            "",
            "```python",
            "run_me_not()",
            "```",
            "```sh",
            "make docs",
            "```",
            "- item",
            "",
            "    ```python",
            "    y = x + 1",
            "    ```",
        ]
    )
    assert code_blocks(text) == [
        (3, "x = 1\n", False),
        (8, "run_me_not()\n", True),
        (16, "y = x + 1\n", False),
    ]


if __name__ == "__main__":
    run_page(Path(sys.argv[1]))
