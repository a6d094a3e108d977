"""The documentation's code runs, and the site covers the whole public API.

Every ```python block of every page under docs/, of README.md and of the docstrings of
the public API (from which the API reference is generated) is executed: a page's
blocks run in order in one namespace, in a fresh Python process, so that a guide sees
what a user sees (JAX's default float32, no state left by other tests, no rule
registered by another page) and cannot rot. A block right after the line
`<!-- skip -->` is not run; keep that for what cannot run in a test (`make docs`).

A ```text block introduced by the line `<!-- output -->` is what the python block before
it prints; the runner compares the two (ignoring how whitespace is laid out), so shown
output, error messages included, cannot drift from what the code prints.

Tracebacks point into the Markdown file: each block is compiled with the page's path as
its file name and its own line numbers.

Run one page by hand with `python tests/test_docs.py docs/guides/pinn.md`.
"""

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARK = "<!-- skip -->"
OUTPUT_MARK = "<!-- output -->"
# Far above what any page needs (the PINN guide, the slowest, takes seconds), so that a
# hang fails the test instead of stalling the suite.
PAGE_TIMEOUT_S = 300

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\n`]*)$")


class Block(NamedTuple):
    """A ```python block: where its code starts, the code, and what it must print."""

    line: int
    code: str
    skipped: bool
    # The text block after `<!-- output -->` that follows this block, if any.
    expected_output: str | None = None


def _fences(lines: list[str]) -> list[tuple[int, int, str, int]]:
    """`(open line, close line, language, indent)` of every fenced block (0-based)."""
    found = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence = match["fence"]
        language = match["info"].strip().split(" ")[0].lstrip(".").lower()
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence)
            and lines[j].strip().strip(fence[0]) == ""
        ):
            j += 1
        found.append((i, j, language, len(match["indent"])))
        i = j + 1
    return found


def _previous_text(lines: list[str], index: int) -> str:
    """The last non-blank line before line `index`, stripped."""
    return next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")


def code_blocks(text: str) -> list[Block]:
    """Every ```python block of `text`, with line numbers counted from 1.

    Blocks nested in lists or admonitions are found too (their common indentation is
    removed). A block is skipped when the last non-blank line before its opening fence
    is `<!-- skip -->`. A ```text block introduced by `<!-- output -->` is what the
    python block before it prints.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    for start, end, language, indent in _fences(lines):

        def body(s: int = start, e: int = end, n: int = indent) -> str:
            return "\n".join(line[n:] for line in lines[s + 1 : e]) + "\n"

        if language in ("python", "py"):
            skipped = _previous_text(lines, start) == SKIP_MARK
            blocks.append(Block(start + 2, body(), skipped))
        elif _previous_text(lines, start) == OUTPUT_MARK:
            if not blocks:
                raise ValueError(f"line {start + 1}: {OUTPUT_MARK} before any code")
            blocks[-1] = blocks[-1]._replace(expected_output=body())
    return blocks


def _normalize(text: str) -> str:
    return " ".join(text.split())


def run_page(path: Path) -> None:
    """Execute the page's blocks in order in one namespace (in this process)."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    for block in code_blocks(path.read_text(encoding="utf-8")):
        if block.skipped:
            continue
        # Leading newlines make the traceback's line numbers those of the Markdown.
        source = "\n" * (block.line - 1) + block.code
        code = compile(source, str(path), "exec")
        if block.expected_output is None:
            exec(code, namespace)
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(code, namespace)
        sys.stdout.write(printed.getvalue())
        if _normalize(printed.getvalue()) != _normalize(block.expected_output):
            raise AssertionError(
                f"{path}:{block.line}: the block printed\n{printed.getvalue()}\n"
                f"but the page shows, after {OUTPUT_MARK},\n{block.expected_output}"
            )


def _docstring(name: str) -> str:
    """The example section of the docstring of `fwdlap.<name>` (from `**Example`)."""
    import inspect

    import fwdlap

    doc = inspect.getdoc(getattr(fwdlap, name)) or ""
    match = re.search(r"^\*\*Examples?:?\*\*", doc, re.MULTILINE)
    return doc[match.start() :] if match else ""


def run_docstring(name: str) -> None:
    """Execute the example code of the docstring of `fwdlap.<name>`, in order."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    for block in code_blocks(_docstring(name)):
        if not block.skipped:
            code = compile(block.code, f"<docstring of fwdlap.{name}>", "exec")
            exec(code, namespace)


def _public_names() -> list[str]:
    import fwdlap

    return sorted(set(fwdlap.__all__) - {"__version__"})


def pages() -> list[Path]:
    found = sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)
    return [*found, ROOT / "README.md"]


def _runnable(path: Path) -> bool:
    return any(not block.skipped for block in code_blocks(path.read_text()))


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _run_in_fresh_process(*args: str) -> None:
    env = dict(os.environ)
    # Like a user's process: no float64 switched on by the test configuration.
    env.pop("JAX_ENABLE_X64", None)
    result = subprocess.run(
        [sys.executable, __file__, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT_S,
    )
    if result.returncode != 0:
        pytest.fail(f"the code failed:\n{result.stderr[-6000:]}", pytrace=False)


@pytest.mark.parametrize("page", [p for p in pages() if _runnable(p)], ids=_page_id)
def test_page_code_runs(page: Path) -> None:
    _run_in_fresh_process(str(page))


def test_docstring_examples_run() -> None:
    """The examples of the API reference, which is generated from the docstrings.

    All of them run in one process (each in a namespace of its own), to start JAX once.
    """
    assert [name for name in _public_names() if _docstring(name)], "no examples found"
    _run_in_fresh_process("--docstrings")


# The benchmarks page shows the results of `make bench` instead of code.
GUIDES = sorted(p for p in (DOCS / "guides").glob("*.md") if p.name != "benchmarks.md")


@pytest.mark.parametrize("page", GUIDES, ids=_page_id)
def test_guides_have_code_that_runs(page: Path) -> None:
    assert _runnable(page), f"{_page_id(page)} has no Python block that the tests run"


def test_every_public_name_has_an_api_page() -> None:
    names = _public_names()
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = []
    for name in names:
        page = DOCS / "api" / f"{name}.md"
        if not page.is_file() or f"::: fwdlap.{name}" not in page.read_text():
            missing.append(
                f"{name} (no docs/api/{name}.md rendering ::: fwdlap.{name})"
            )
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
    (tmp_path / "bad.css").write_text(
        "@font-face{src:url(//fonts.gstatic.com/x.woff2)}"
    )
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
            "    print(x + 1)",
            "    ```",
            "    <!-- output -->",
            "    ```text",
            "    2",
            "    ```",
            "```text",
            "not an expected output",
            "```",
        ]
    )
    assert code_blocks(text) == [
        Block(3, "x = 1\n", False),
        Block(8, "run_me_not()\n", True),
        Block(16, "print(x + 1)\n", False, "2\n"),
    ]


def test_run_page_compares_printed_output(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    shown = "```python\nprint('a  b')\n```\n<!-- output -->\n```text\na\nb\n```\n"
    page.write_text(shown)
    run_page(page)  # whitespace differences do not matter
    page.write_text(shown.replace("a\nb", "a c"))
    with pytest.raises(AssertionError, match="the block printed"):
        run_page(page)


if __name__ == "__main__":
    if sys.argv[1] == "--docstrings":
        for name in _public_names():
            run_docstring(name)
    else:
        run_page(Path(sys.argv[1]))
