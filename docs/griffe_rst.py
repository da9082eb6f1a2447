"""A Griffe extension that makes the project's reST-flavoured docstrings render as Markdown (the docs site only).

The docstrings are free-form text (no Google / NumPy / Sphinx sections) with two reST habits that Markdown does not
share; both are rewritten in the loaded docstrings, the sources are untouched:

* roles, ``:func:`name``` / ``:class:`~pkg.Name``` / ``:mod:`` / ``:meth:`` / ``:data:`` / ``:attr:`` / ``:exc:``:
  an optional cross-reference to the object (a link where the site documents it, plain code otherwise; relative
  names are resolved in the docstring's scope, ``~`` shows the last component only);
* literal blocks, ``paragraph::`` + blank line + indented block: ``text::`` becomes ``text:``, ``text ::`` becomes
  ``text`` and a lone ``::`` line goes (the indented block is already a Markdown code block);
* doctest examples, a run of ``>>>`` / ``...`` lines and the output lines after them up to a blank line: fenced as a
  ``python`` code block (Markdown would read ``p["kernel"]`` in them as a link).

Loaded by mkdocstrings (``mkdocs.yml``: ``extensions: [docs/griffe_rst.py]``).
"""

from __future__ import annotations

import html
import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):`(~?)([^`<>]+)`")
# reST literal-block markers (followed by a blank line): "text::" -> "text:", "text ::" -> "text", "::" alone -> ""
LITERAL = re.compile(r"(?m)^(?:(.*\S)([ \t]*))?::[ \t]*\n(?=[ \t]*\n)")
PACKAGES = ("jaxmodels", "merging", "quant")


def _target(obj: griffe.Object, name: str) -> str:
    """The full path of ``name`` as seen from ``obj``'s scope (unchanged if absolute or unresolvable)."""
    head, _, rest = name.partition(".")
    if head in PACKAGES:
        return name
    try:
        full = obj.resolve(head)
    except Exception:  # noqa: BLE001 - griffe raises several kinds; unresolved names stay as written
        return name
    return f"{full}.{rest}" if rest else full


def fence_doctests(text: str) -> str:
    """Every doctest run (``>>>`` line, its ``...`` continuations and output lines, up to a blank line or the end)
    wrapped in a fenced ``python`` block at its own indentation; other lines unchanged."""
    out, block, indent = [], [], ""
    for line in text.split("\n") + [""]:
        if block and line.strip():
            block.append(line)
            continue
        if block:
            out += [indent + "```python", *block, indent + "```"]
            block = []
        if line.lstrip().startswith(">>>"):
            indent, block = line[:len(line) - len(line.lstrip())], [line]
        else:
            out.append(line)
    return "\n".join(out[:-1])


def rst_to_markdown(text: str, obj: griffe.Object) -> str:
    """The docstring ``text`` of ``obj`` with reST roles as optional autorefs and ``::`` literal markers as ``:``."""

    def role(m: re.Match) -> str:
        name = m.group(2).strip()
        shown = name.rsplit(".", 1)[-1] if m.group(1) else name
        ident = html.escape(_target(obj, name), quote=True)
        return f'<autoref identifier="{ident}" optional><code>{html.escape(shown)}</code></autoref>'

    def literal(m: re.Match) -> str:
        if m.group(1) is None:
            return ""
        return m.group(1) + ("\n" if m.group(2) else ":\n")

    return fence_doctests(LITERAL.sub(literal, ROLE.sub(role, text)))


class RstDocstrings(griffe.Extension):
    """Rewrite every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = rst_to_markdown(obj.docstring.value, obj)
            stack.extend(m for m in obj.members.values() if not m.is_alias)
