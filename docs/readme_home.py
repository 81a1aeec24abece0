"""MkDocs hook (``mkdocs.yml``): the site's home page is ``README.md``, its links into ``docs/`` made
relative to the site, so the landing page is written once."""

from __future__ import annotations

import pathlib


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "index.md":
        return markdown
    readme = pathlib.Path(config.config_file_path).parent / "README.md"
    return readme.read_text(encoding="utf-8").replace("](docs/", "](")
