"""Griffe extension: the Sphinx roles of the docstrings become links in the API reference.

The docstrings cross-reference with roles (``:class:`~medanomaly.image.MedicalImage```,
``:func:`read_image```), which ``medanomaly models`` and help texts read as plain text. For the
site each role becomes an optional mkdocs-autorefs link: a link where the site documents the
target, code where it does not. A role whose target is in ``medanomaly`` but does not exist
(a name that moved or was renamed) is a warning, so ``mkdocs build --strict`` fails on it;
targets outside the package (``json.dump``, ``torch.Tensor``) are shown as code.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import griffe

ROLE = re.compile(
    r"(?<!``):(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):`(?P<tilde>~?)(?P<text>[^`<]+?)"
    r"(?:\s*<(?P<target>[^>]+)>)?`"
)
PACKAGE = "medanomaly"


class SphinxRoles(griffe.Extension):
    """Rewrite roles once the whole package is loaded (every target can then be checked)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite the roles of every docstring of ``pkg``."""
        if pkg.name == PACKAGE:
            _rewrite(pkg, pkg)


def _rewrite(obj: griffe.Object, pkg: griffe.Module) -> None:
    if obj.is_alias:
        return
    if obj.docstring is not None:
        obj.docstring.value = ROLE.sub(lambda m: _link(m, obj, pkg), obj.docstring.value)
    for member in obj.members.values():
        _rewrite(member, pkg)


def _link(match: re.Match[str], obj: griffe.Object, pkg: griffe.Module) -> str:
    written = (match["target"] or match["text"]).strip()
    title = written.split(".")[-1] if match["tilde"] else match["text"].strip()
    target = _resolve(written.lstrip("."), obj, pkg)
    if target is None:
        griffe.logger.warning(
            "%s:%s: %s names nothing in %s",
            obj.relative_filepath,
            obj.lineno,
            match[0],
            PACKAGE,
        )
        return f"`{title}`"
    if not target.startswith(f"{PACKAGE}."):
        return f"`{title}`"
    return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'


def _exists(path: str, pkg: griffe.Module) -> bool:
    parts = path.split(".")
    if parts[0] != PACKAGE:
        return False
    try:
        pkg[".".join(parts[1:])] if len(parts) > 1 else pkg
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return True


def _resolve(written: str, obj: griffe.Object, pkg: griffe.Module) -> str | None:
    """The full path of a role's target; an outside name as written; ``None``: not found."""
    if written.split(".")[0] == PACKAGE:
        return written if _exists(written, pkg) else None
    head, _, rest = written.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        found = _in_scope(head, scope)
        if found is not None:
            full = f"{found}.{rest}" if rest else found
            if not full.startswith(f"{PACKAGE}."):
                return full  # json.dump, torch.Tensor.unfold: outside the package
            return full if _exists(full, pkg) else None
        scope = scope.parent
    if rest and importlib.util.find_spec(head) is not None:
        return written  # monai.losses.DiceCELoss: outside the package, not imported by name
    return _in_module_classes(head, obj)


def _in_scope(name: str, scope: griffe.Object) -> str | None:
    """``name`` as a member (inherited ones too), import or alias of ``scope``."""
    if scope.is_class and name in scope.all_members:
        return f"{scope.path}.{name}"
    try:
        return scope.resolve(name)
    except griffe.NameResolutionError:
        return None


def _in_module_classes(name: str, obj: griffe.Object) -> str | None:
    """A method or attribute of a class of ``obj``'s module (a module docstring's ``:meth:``)."""
    module = obj.module
    for member in module.members.values():
        if not member.is_alias and member.is_class and name in member.all_members:
            return f"{member.path}.{name}"
    return None
