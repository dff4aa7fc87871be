"""Components by name: the only way a config, a message or a file names code.

A config node names its component with Hydra's ``_target_`` key, as in ``conf/``; but the name
is looked up in a table of its group, never imported. A name that is not in the table
(``builtins.open``, ``os.system``, a typo) is refused with the names that are.

This module is the mechanism only (a leaf: it imports nothing of the project). The tables
live where their components are known: :mod:`docl_flower.core.training.recipes` (optimisers,
schedulers, augmentation: what a client builds from a recipe),
:mod:`docl_flower.core.pipeline.components` (every component of the core a config may name)
and :mod:`docl_flower.federation.components` (those plus the Flower layer's workflows). A
table is written out in one place; nothing registers itself by being imported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

Factory = Callable[..., object]


class UnknownComponentError(ValueError):
    """A config, message or file names a component that is not registered."""


class Registry:
    """Tables of named components, one per config group.

    Parameters
    ----------
    tables : mapping
        Group -> name -> factory (copied).
    hints : mapping, optional
        Group -> what to add to the message when that group's table is still empty.
    """

    def __init__(
        self,
        tables: Mapping[str, Mapping[str, Factory]],
        hints: Mapping[str, str] | None = None,
    ) -> None:
        self._tables = {group: dict(table) for group, table in tables.items()}
        self._hints = dict(hints or {})

    def tables(self) -> dict[str, dict[str, Factory]]:
        """A copy of every table."""
        return {group: dict(table) for group, table in self._tables.items()}

    def extended(self, tables: Mapping[str, Mapping[str, Factory]]) -> Registry:
        """A new registry: these tables plus ``tables`` (a name given twice is refused)."""
        merged = self.tables()
        for group, table in tables.items():
            mine = merged.setdefault(group, {})
            twice = sorted(set(mine) & set(table))
            if twice:
                raise ValueError(f"{group}: names registered twice: {twice}")
            mine.update(table)
        hints = {g: h for g, h in self._hints.items() if not merged.get(g)}
        return Registry(merged, hints)

    def names(self, group: str) -> list[str]:
        """The registered names of ``group``."""
        return sorted(self._tables.get(group, {}))

    def name_of(self, group: str, factory: Factory) -> str:
        """The name ``factory`` is registered under in ``group`` (the first, sorted)."""
        for name, made in sorted(self._tables.get(group, {}).items()):
            if made is factory:
                return name
        raise UnknownComponentError(f"{group}: {factory!r} is not a registered component")

    def factory(self, group: str, name: object) -> Factory:
        """The component registered as ``name`` in ``group``; raises for any other name."""
        table = self._tables.get(group, {})
        if not isinstance(name, str) or name not in table:
            hint = self._hints.get(group, "") if not table else ""
            raise UnknownComponentError(
                f"unknown {group} {name!r}: not a registered component "
                f"(known: {self.names(group)}){hint}"
            )
        return table[name]

    def build(self, group: str, node: Mapping[str, object], partial: bool | None = None) -> object:
        """Build the component a config node names (``_target_``, optional ``_partial_``).

        The other keys are keyword arguments; ``_partial_: true`` returns a
        :func:`functools.partial` (for optimisers and schedulers that need more arguments
        later). Raises :class:`UnknownComponentError` for an unregistered name and
        ``ValueError`` for arguments the component rejects.
        """
        if not isinstance(node, Mapping):
            raise ValueError(f"{group}: expected a config mapping, got {type(node).__name__}")
        kwargs = {str(k): v for k, v in node.items()}
        make = self.factory(group, kwargs.pop("_target_", None))
        asked = kwargs.pop("_partial_", False)
        if asked not in (True, False):
            raise ValueError(f"{group}: _partial_ must be true or false, got {asked!r}")
        if asked if partial is None else partial:
            return functools.partial(make, **kwargs)
        try:
            return make(**kwargs)
        except TypeError as err:  # unknown or missing keyword arguments
            raise ValueError(f"invalid {group} config: {err}") from err
