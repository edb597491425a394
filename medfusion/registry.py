"""A small name -> factory registry (after timm's ``@register_model``).

Used for encoders and fusion heads; the test suite iterates over it, so nothing is a hand-kept
list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories.

    Args:
        kind: what is registered (used in error messages), e.g. ``"encoder"``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``factory`` under ``name``."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered.")
            self._factories[name] = factory
            return factory

        return deco

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the registered object ``name`` with ``kwargs``.

        Raises:
            KeyError: unknown name (the message lists the registered names).
        """
        return self.factory(name)(**kwargs)

    def factory(self, name: str) -> Callable[..., T]:
        """The registered class/factory ``name`` (without calling it).

        Raises:
            KeyError: unknown name.
        """
        if name not in self._factories:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self._factories)}.")
        return self._factories[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories
