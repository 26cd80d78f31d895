"""MkDocs hook: fail the build when a page shows a raw Sphinx role such as ``:func:`x```.

mkdocstrings renders Google-style docstrings as Markdown, where cross-references are written
``[convlora.inject][]`` or ``[`inject`][convlora.inject]``. A Sphinx role left in a docstring is
printed verbatim (``:class:`~convlora.LoRAConfig```), so this hook checks every rendered page.
"""

from __future__ import annotations

import re
from typing import Any

from mkdocs.exceptions import PluginError

# After Markdown rendering a role's backticks have become <code>; before, they are backticks.
RAW_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const|ref):(?:`|<code)")


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    """Raise when the rendered ``html`` of ``page`` contains a raw Sphinx role."""
    hits = sorted({m.group(0).split("<")[0].rstrip("`") for m in RAW_ROLE.finditer(html)})
    if hits:
        raise PluginError(
            f"{page.file.src_path}: raw Sphinx role(s) {', '.join(hits)} in the rendered page; "
            "write cross-references as [convlora.inject][] or [`inject`][convlora.inject]"
        )
    return html
