"""The documentation site: a strict build with no warning, a reference entry for every public name,
docstring arguments that exist, and internal links that resolve in the built site."""

import html
import html.parser
import inspect
import os
import pathlib
import re
import subprocess
import sys
import urllib.parse

import pytest

import jaxbptt as jb

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference"
DIRECTIVE = re.compile(r"^::: jaxbptt\.(\w+)\s*$", flags=re.M)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built once for this module by `mkdocs build --strict` (which fails on any warning:
    an unresolved link or anchor, a docstring griffe cannot parse, a page missing from the nav)."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # Material's notice about MkDocs 2.0, not a build warning
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr, result.stdout + result.stderr
    return out


def _public_members(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:  # the module's own public functions and classes
        names = [n for n, o in vars(module).items() if not n.startswith("_") and getattr(o, "__module__", None) ==
                 module.__name__ and (inspect.isfunction(o) or inspect.isclass(o))]
    return sorted(names)


def test_every_public_name_has_one_reference_entry(site):
    """Each name of `jaxbptt.__all__` has exactly one `::: jaxbptt.NAME` entry, and the built site
    renders it (and, for the two submodules, each of their public members) under its own anchor."""
    entries = [n for page in sorted(REFERENCE.glob("*.md")) for n in DIRECTIVE.findall(page.read_text())]
    assert sorted(entries) == sorted(set(entries)), "a name has two reference entries"
    assert sorted(set(jb.__all__) - set(entries)) == [], "public names without a reference entry"
    assert sorted(set(entries) - set(jb.__all__)) == [], "reference entries for names that are not public"
    rendered = "".join(p.read_text() for p in (site / "reference").rglob("*.html"))
    expected = [f"jaxbptt.{n}" for n in jb.__all__]
    expected += [f"jaxbptt.{m}.{n}" for m in ("adapters", "tasks") for n in _public_members(getattr(jb, m))]
    missing = [anchor for anchor in expected if f'id="{anchor}"' not in rendered]
    assert missing == [], f"reference entries not rendered: {missing}"


def _documented_arguments(doc: str) -> list[str]:
    """The names in a Google-style `Args:` section; one entry may name several (`a, b: ...`)."""
    lines = doc.splitlines()
    if "Args:" not in lines:
        return []
    names = []
    for line in lines[lines.index("Args:") + 1:]:
        if line and not line.startswith(" "):
            break  # the next section
        entry = re.match(r"^  (\*{0,2}\w+(?:, \*{0,2}\w+)*):", line)
        if entry:
            names += [n.lstrip("*") for n in entry.group(1).split(", ")]
    return names


def _documented_functions():
    for name in jb.__all__:
        obj = getattr(jb, name)
        if inspect.ismodule(obj):
            yield from ((f"{name}.{n}", getattr(obj, n)) for n in _public_members(obj))
        else:
            yield name, obj


def test_docstring_arguments_are_in_the_signatures():
    """Every argument a public docstring documents exists in the signature (the reference renders
    the `Args:` section as it is, so a stale or misspelt entry would document nothing)."""
    stale = {}
    for name, obj in _documented_functions():
        if not callable(obj) or inspect.isclass(obj):
            continue
        documented = _documented_arguments(inspect.getdoc(obj) or "")
        parameters = inspect.signature(obj).parameters
        unknown = [a for a in documented if a not in parameters]
        if unknown:
            stale[name] = unknown
    assert stale == {}


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        for key in ("href", "src"):
            if attrs.get(key) and not (tag == "link" and key == "href" and attrs.get("rel") == "canonical"):
                self.links.append(attrs[key])


def _parse(path: pathlib.Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_internal_links_resolve(site):
    """Every relative link and image of every built page points to a file of the site, and every
    fragment to an anchor of its page."""
    pages = {p: _parse(p) for p in site.rglob("*.html")}
    broken = []
    for page, parsed in pages.items():
        for link in parsed.links:
            url = urllib.parse.urlsplit(link)
            if url.scheme or url.netloc or link.startswith("//"):
                continue  # external
            path = urllib.parse.unquote(url.path)
            base = site if path.startswith("/") else page.parent  # 404.html links from the site's root
            target = (base / path.lstrip("/")).resolve() if path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(site)}: {link}")
            elif url.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if urllib.parse.unquote(url.fragment) not in ids:
                    broken.append(f"{page.relative_to(site)}: {link} (no such anchor)")
    assert broken == []
    assert (site / "index.html").exists() and (site / "reference" / "cells" / "index.html").exists()


def test_docstring_literal_blocks_render_as_code(site):
    """An rST literal block (`roughly equivalent to::` + an indented loop, as in `unroll`'s
    docstring) is rendered as a code block, not run together as a paragraph."""
    page = (site / "reference" / "gradients" / "index.html").read_text(encoding="utf-8")
    blocks = [re.sub(r"<[^>]+>", "", b) for b in re.findall(r'<div class="highlight">(.*?)</div>', page, flags=re.S)]
    assert any("for t in range(T):\n" in html.unescape(b) for b in blocks)
