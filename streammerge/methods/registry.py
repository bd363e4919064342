"""The registry: merge method name -> its declaration. A method file registers itself with
`@register`; `streammerge/methods/__init__.py` imports each file (one line per method family)."""

from __future__ import annotations

from .base import Method

_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: declares a method under `cls.name`."""
    if cls.name in _REGISTRY:
        raise RuntimeError(f"merge method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Method | None:
    return _REGISTRY.get(name)


def names() -> list[str]:
    return sorted(_REGISTRY)


def all_methods() -> list[Method]:
    return [_REGISTRY[n] for n in names()]
