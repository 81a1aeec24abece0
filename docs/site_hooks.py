"""MkDocs hooks (``mkdocs.yml``): the home page is the README, and the API reference misses no module.

* ``index.md`` becomes ``README.md``, its links into ``docs/`` made relative to the site, so the
  landing page is written once.
* ``reference/more.md`` gets a mkdocstrings directive for every module or package of
  ``lightning_kr`` that no other reference page names (a page naming a package covers its
  submodules, except the top-level page), so a new package, or a module moved out of another, is
  documented without a change here.
* Sphinx roles in docstrings (``:class:`~a.b.C```) render as the code they name (``C``), as Sphinx
  shows them, instead of as literal ``:class:`` text (mkdocstrings reads docstrings as Markdown).
"""

from __future__ import annotations

import pathlib
import re

DIRECTIVE = re.compile(r"^::: (\S+)", re.M)
SPHINX_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>"
)


def on_page_markdown(markdown, page, config, files):
    root = pathlib.Path(config.config_file_path).parent
    if page.file.src_uri == "index.md":
        return (root / "README.md").read_text(encoding="utf-8").replace("](docs/", "](")
    if page.file.src_uri == "reference/more.md":
        return markdown + "\n" + _directives_for_unnamed_modules(root)
    return markdown


def on_page_content(html, page, config, files):
    return SPHINX_ROLE.sub(_role_as_code, html)


def _role_as_code(match: re.Match) -> str:
    short, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def _directives_for_unnamed_modules(root: pathlib.Path) -> str:
    reference = root / "docs" / "reference"
    named = {
        name
        for path in reference.glob("*.md")
        if path.name != "more.md"
        for name in DIRECTIVE.findall(path.read_text(encoding="utf-8"))
    }
    package = root / "lightning_kr"
    modules = sorted(
        path.stem if path.suffix == ".py" else path.name
        for path in package.iterdir()
        if not path.name.startswith("_")
        and (path.suffix == ".py" or (path / "__init__.py").is_file())
    )
    unnamed = [module for module in modules if f"lightning_kr.{module}" not in named]
    if not unnamed:
        return "Every module of `lightning_kr` has its place on one of the other pages.\n"
    return "\n".join(
        f"::: lightning_kr.{module}\n    options:\n      heading_level: 2\n      show_submodules: true\n"
        for module in unnamed
    )
