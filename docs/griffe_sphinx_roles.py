"""Griffe extension for `make docs`: Sphinx roles in docstrings (:func:`odeint`) become Markdown.

A role naming something on the API page becomes a link to it; any other becomes inline code.
"""

import re
from pathlib import Path

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|data|mod|exc|obj):`~?([^`]+)`")
_API = Path(__file__).with_name("api.md")


class SphinxRoles(griffe.Extension):
    def __init__(self) -> None:
        super().__init__()
        self.documented = set(re.findall(r"^::: (neuralode\.[\w.]+)$", _API.read_text(), flags=re.M))

    def _target(self, name: str) -> str | None:
        for candidate in (name, f"neuralode.{name}"):
            head = candidate.rsplit(".", 1)[0]
            if candidate in self.documented or head in self.documented:
                return candidate
        return None

    def _rewrite(self, match: re.Match) -> str:
        name = match.group(1)
        target = self._target(name)
        return f"[`{name}`][{target}]" if target else f"`{name}`"

    def on_object(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(self._rewrite, obj.docstring.value)
