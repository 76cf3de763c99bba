"""A griffe extension: reStructuredText literal blocks in docstrings rendered as code.

The library's docstrings give a function's equivalent loop as `lax.scan`'s do, in rST style: a
paragraph ending with `::` and an indented block after a blank line. Markdown reads that block as
running text, so this extension turns each one into a fenced Python block (and the paragraph's
`::` into `:`) before mkdocstrings renders it. The docstrings themselves stay as they are.
"""

from __future__ import annotations

import re

import griffe


def fence_literal_blocks(text: str) -> str:
    """`text` with every `para::` + blank line + indented block turned into `para:` + a fenced block."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        head = line.rstrip()[:-1]  # "Roughly::" -> "Roughly:"
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block_end = j
        while block_end < len(lines) and (not lines[block_end].strip() or
                                          len(lines[block_end]) - len(lines[block_end].lstrip()) > indent):
            block_end += 1
        while block_end > j and not lines[block_end - 1].strip():
            block_end -= 1
        if block_end == j:  # no indented block follows: leave the line alone
            out.append(line)
            i += 1
            continue
        body = lines[j:block_end]
        cut = min(len(b) - len(b.lstrip()) for b in body if b.strip())
        pad = " " * indent
        if head.strip() != ":":
            out += [head, ""]
        out += [pad + "```python", *[(pad + b[cut:]) if b.strip() else "" for b in body], pad + "```", ""]
        i = block_end
    return "\n".join(out)


class LiteralBlocks(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and re.search(r"::\s*$", obj.docstring.value, flags=re.M):
            obj.docstring.value = fence_literal_blocks(obj.docstring.value)
