"""MkDocs hooks of the fwdlap documentation (listed under `hooks:` in mkdocs.yml).

1. The benchmarks guide shows the table and plot that `make bench` writes to
   `benchmarks/results/`: the marker `<!-- benchmark-results -->` in its Markdown is
   replaced by `results.md` (or, failing that, `results_quick.md` from
   `make bench-quick`), and the PNG beside it is added to the site. Without results
   the page says how to produce them, and the build still passes.
2. The site must work offline: after the build, every HTML and CSS file is scanned, and
   a script, stylesheet, font or image loaded from another host fails the build.
3. `mkdocs build --strict --quiet` must still fail on warnings (a broken link or
   cross-reference): `--quiet` raises MkDocs' log level to ERROR, so warnings would not
   even be logged, and strict mode counts logged warnings. In strict mode the level is
   put back to WARNING, so `--quiet` hides only the INFO lines.
"""

import logging
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

_ROOT = Path(__file__).resolve().parents[2]
_RESULTS = _ROOT / "benchmarks" / "results"
_PAGE = "guides/benchmarks.md"
_MARKER = "<!-- benchmark-results -->"
_IMAGE_URI = "guides/benchmark-results.png"


def _results() -> tuple[Path | None, Path | None]:
    """The newest full results (`results.*`), else those of a quick run."""
    for stem in ("results", "results_quick"):
        md = _RESULTS / f"{stem}.md"
        if md.is_file():
            png = _RESULTS / f"{stem}.png"
            return md, png if png.is_file() else None
    return None, None


def on_config(config: Any) -> Any:
    mkdocs_logger = logging.getLogger("mkdocs")
    if config["strict"] and mkdocs_logger.getEffectiveLevel() > logging.WARNING:
        mkdocs_logger.setLevel(logging.WARNING)
    return config


def on_files(files: Files, config: Any) -> Files:
    _, png = _results()
    if png is not None:
        files.append(File.generated(config, _IMAGE_URI, abs_src_path=str(png)))
    return files


def _demote_headings(markdown: str, levels: int) -> str:
    """Push every ATX heading down `levels` levels, outside fenced code blocks."""
    out: list[str] = []
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.src_uri != _PAGE or _MARKER not in markdown:
        return markdown
    md, png = _results()
    if md is None:
        body = (
            '!!! note "No benchmark results in this checkout"\n\n'
            "    `benchmarks/results/results.md` does not exist yet. Run `make bench` "
            "(or `make bench-quick` for a smoke run) and rebuild the docs: the table "
            "and the plot then appear here.\n"
        )
    else:
        quick = md.stem.endswith("_quick")
        text = md.read_text(encoding="utf-8")
        # The report's own title becomes a subsection of this page.
        text = re.sub(r"\A# [^\n]*\n", "", text)
        parts = []
        if quick:
            parts.append(
                '!!! warning "Smoke run"\n\n'
                "    These numbers come from `make bench-quick` (fewer sizes, methods "
                "and repeats). Run `make bench` for the full grid.\n"
            )
        parts.append(f"*From `benchmarks/results/{md.name}`.*\n")
        if png is not None:
            parts.append(
                "[![Run time per configuration against the number of electrons, one "
                "panel per model](benchmark-results.png)](benchmark-results.png)\n"
            )
        parts.append(_demote_headings(text, 1))
        body = "\n".join(parts)
    return markdown.replace(_MARKER, body)


# --- offline check --------------------------------------------------------------------

# Attributes and CSS that make a browser fetch something while showing the page.
_HTML_FETCH = re.compile(
    r"<(script|img|iframe|source|audio|video)\b[^>]*\bsrc\s*=\s*"
    r"[\"']?(?P<url>[^\"' >]+)"
    r"|<link\b(?=[^>]*\brel\s*=\s*[\"']?(?:stylesheet|preload|preconnect|icon|"
    r"modulepreload))[^>]*\bhref\s*=\s*[\"']?(?P<url2>[^\"' >]+)",
    re.IGNORECASE,
)
_CSS_FETCH = re.compile(
    r"@import\s+[\"'](?P<url>[^\"']+)|url\(\s*[\"']?(?P<url2>[^\"')]+)", re.IGNORECASE
)


def _is_remote(url: str) -> bool:
    return bool(re.match(r"(https?:)?//", url.strip(), re.IGNORECASE))


def remote_fetches(site_dir: Path) -> list[str]:
    """Every `file: url` pair of the built site that loads a resource from the web."""
    found: list[str] = []
    for path in sorted(site_dir.rglob("*")):
        if path.suffix not in (".html", ".css") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        pattern = _HTML_FETCH if path.suffix == ".html" else _CSS_FETCH
        for match in pattern.finditer(text):
            url = match.group("url") or match.group("url2") or ""
            if _is_remote(url):
                found.append(f"{path.relative_to(site_dir)}: {url}")
    return found


def on_post_build(config: Any) -> None:
    found = remote_fetches(Path(config["site_dir"]))
    if found:
        raise PluginError(
            "The documentation must work offline, but these pages load resources from "
            "the web: " + "; ".join(found[:20]) + ". Ship the asset under docs/assets/ "
            "instead."
        )
