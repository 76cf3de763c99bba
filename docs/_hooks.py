"""mkdocs hooks: the repository's README.md is the site's front page.

The README links into the docs as `docs/PAGE.md` (which works on GitHub); on the site the same page
is `index.md` at the root of `docs/`, so those links lose their `docs/` prefix. Any other relative
link in the README would point outside the site and fails the strict build.
"""

from __future__ import annotations

import pathlib
import re

from mkdocs.structure.files import File

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def front_page(readme: str) -> str:
    """The README's text with its `docs/` links made relative to the docs directory."""
    return re.sub(r"\]\(docs/", "](", readme)


def on_files(files, config):
    files.append(File.generated(config, "index.md", content=front_page(README.read_text(encoding="utf-8"))))
    return files


def on_serve(server, config, builder):
    server.watch(str(README))
    return server
