"""
A griffe extension for the docs build: Sphinx roles in docstrings become code spans.

The package's docstrings cross-reference with Sphinx roles (``:class:`~airflow_provider_ppio.x.Y```), which
mkdocstrings would print as they are. ``:role:`~a.b.C``` becomes ```C``` and ``:role:`a.b.C``` becomes
```a.b.C```. Loaded by mkdocs.yml (mkdocstrings' python handler, ``extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|exc|attr|data|obj|const):`(~?)([^`]+)`")


def plain(text: str) -> str:
    """
    Sphinx roles in ``text`` as Markdown code spans.

    :param text: A docstring.
    """
    return _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)


class SphinxRoles(griffe.Extension):
    """Rewrites the roles in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """
        Rewrite one object's docstring.

        :param obj: The object griffe just loaded.
        :param kwargs: The other hook arguments (unused).
        """
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
