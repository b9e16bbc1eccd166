"""The API reference covers the public names, and the Markdown pages link to files that exist.

Needs no mkdocs: `make docs` builds the site with `mkdocs build --strict`, which checks the same links and more
(anchors, cross-references); this test keeps the two promises that a pull request breaks most easily.
"""

import re
from pathlib import Path

import pytest

import sparsemix

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"

# Public names with no `::: sparsemix.<name>` entry, each with the reason.
OMITTED = {
    "__version__": "a version string, not an object with a docstring; docs/api/index.md mentions it",
}

DIRECTIVE = re.compile(r"^:::\s+(\S+)\s*$", re.MULTILINE)
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)


def _api_directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for page in sorted(API.glob("*.md")):
        for identifier in DIRECTIVE.findall(page.read_text(encoding="utf-8")):
            found.setdefault(identifier, []).append(page.name)
    return found


def test_every_public_name_has_a_reference_entry():
    documented = _api_directives()
    missing = [name for name in sparsemix.__all__ if name not in OMITTED and f"sparsemix.{name}" not in documented]
    assert not missing, (
        f"public names without a `::: sparsemix.<name>` line in docs/api/*.md: {missing}; "
        "add one, or list the name in OMITTED with the reason"
    )


def test_omitted_names_are_public():
    assert set(OMITTED) <= set(sparsemix.__all__), "OMITTED lists a name that sparsemix.__all__ no longer has"


def test_reference_uses_top_level_names_only():
    # Modules move inside the package; the reference names objects as users import them, sparsemix.<name>.
    for identifier, pages in _api_directives().items():
        package, _, name = identifier.partition(".")
        assert package == "sparsemix" and name in sparsemix.__all__, (
            f"{pages}: `::: {identifier}` is not a name of sparsemix.__all__ (no submodule paths)"
        )
        assert len(pages) == 1, f"`::: {identifier}` is rendered on several pages: {pages}"


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def _relative_links(text: str) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    links = []
    for target in LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
            continue  # http:, mailto:, anchors within the page; absolute paths checked below
        links.append(target)
    return links


def test_link_pattern_finds_links():
    sample = 'See [a](b.md#c), ![img](img/x.png "t"), [w](https://x.org), `[no](code.md)`, [self](#here).'
    assert _relative_links(sample) == ["b.md#c", "img/x.png"]


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(page):
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"\]\(/", CODE_SPAN.sub("", FENCE.sub("", text))), (
        f"{page.name}: absolute link; link relative to the page"
    )
    broken = []
    for target in _relative_links(text):
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path and not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"
    if page.is_relative_to(DOCS):
        # The site is built from docs/ alone: a page must not link outside it.
        outside = [
            t
            for t in _relative_links(text)
            if t.split("#", 1)[0] and not (page.parent / t.split("#", 1)[0]).resolve().is_relative_to(DOCS)
        ]
        assert not outside, f"{page.relative_to(ROOT)}: links outside docs/ (the site has no such page): {outside}"
