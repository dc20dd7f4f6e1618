"""A small name -> factory registry used by nets, losses and attacks.

Register, don't branch: ``@NETS.register("small_cnn")`` then ``NETS.create("small_cnn", **kw)``.
Unknown names raise :class:`~service.errors.UnknownName` listing the known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from service.errors import UnknownName

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories of one kind of thing (networks, losses, attacks)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that registers ``factory`` under ``name`` (names are unique)."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = factory
            return factory

        return deco

    def get(self, name: str, field: str | None = None) -> Callable[..., T]:
        """Return the factory for ``name`` or raise UnknownName listing the known names."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownName(
                f"unknown {self.kind} {name!r}; known: {known}", field=field or self.kind
            ) from None

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the registered thing ``name`` with keyword arguments."""
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
