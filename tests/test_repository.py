"""What a user of the repository reads is in the repository.

The CPU scheduler flag that jaxlib 0.10 needs is explained where users look (the
installation page, the README, the FAQ), and no file points readers to a document that
is not part of the repository.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# Spelled in pieces so that this file does not match itself.
OUTSIDE_DOCUMENTS = ("DESIGN" + ".md", "JAX_PORTING" + ".md")
SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".cfg", ".txt", ".pyi", ""}


def _files(top: str) -> list[Path]:
    base = ROOT / top
    if base.is_file():
        return [base]
    return [
        p
        for p in sorted(base.rglob("*"))
        if p.is_file()
        and p.suffix in SUFFIXES
        and "assets" not in p.parts
        and "__pycache__" not in p.parts
    ]


@pytest.mark.parametrize(
    "top",
    [
        "src",
        "tests",
        "docs",
        "examples",
        "typings",
        "README.md",
        "Makefile",
        "pyproject.toml",
        "mkdocs.yml",
        "benchmarks",
    ],
)
def test_no_file_refers_to_documents_outside_the_repository(top: str) -> None:
    if not (ROOT / top).exists():
        pytest.skip(f"{top} is not part of this checkout")
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in _files(top)
        for name in OUTSIDE_DOCUMENTS
        if name in path.read_text(encoding="utf-8", errors="replace")
    ]
    assert not found, found


def test_installation_page_explains_the_scheduler_flag() -> None:
    page = (ROOT / "docs" / "installation.md").read_text(encoding="utf-8")
    assert FLAG in page and "before JAX starts" in page and "0.10" in page
    assert "installation.md" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert FLAG in readme and "docs/installation.md" in readme


def test_faq_describes_the_hang() -> None:
    faq = (ROOT / "docs" / "guides" / "faq.md").read_text(encoding="utf-8")
    assert "BlockUntilReady" in faq and FLAG in faq
