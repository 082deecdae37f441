"""A name -> object registry shared by integrators, residual functions, datasets and optimizers."""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

from msnet.errors import MsnetError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to registered objects (usually classes that carry their facts).

    ``kind`` names what is registered ("integrator", "dataset", ...) so that a
    lookup of an unknown name fails with one line listing the valid choices.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("euler")`` adds the decorated object under ``name``."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name raises :class:`MsnetError`."""
        try:
            return self._items[name]
        except KeyError:
            raise MsnetError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
