"""The registry: merge method name -> its declaration. A method file registers itself with
`@register`; `streammerge/methods/__init__.py` imports each file (one line per method family)."""

from __future__ import annotations

from streammerge.methods.base import Method

_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: declares a method under `cls.name`."""
    if cls.name in _REGISTRY:
        raise RuntimeError(f"merge method {cls.name!r} is registered twice")
    for p in cls.params:  # filters and gradients interpolate numbers: a flag or a choice is one value per merge
        if p.kind in (bool, str) and p.per_tensor:
            raise RuntimeError(f"{cls.name}: parameter {p.name!r} ({p.kind.__name__}) must be declared per_tensor=False")
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Method | None:
    return _REGISTRY.get(name)


def names() -> list[str]:
    return sorted(_REGISTRY)


def all_methods() -> list[Method]:
    return [_REGISTRY[n] for n in names()]


def describe() -> list[dict]:
    """Every method as plain data: what `streammerge methods --json` prints."""
    out = []
    for m in all_methods():
        params = []
        for p in m.params:
            entry = {"name": p.name, "kind": p.kind.__name__, "default": p.default, "per_model": p.per_model,
                     "per_tensor": p.per_tensor, "doc": p.doc}
            if p.presets:
                entry["preset_defaults"] = dict(p.presets)
            if p.low is not None or p.high is not None:
                entry["range"] = [p.low, p.high, "open" if p.low_open else "closed", "open" if p.high_open else "closed"]
            if p.choices:
                entry["choices"] = list(p.choices)
            params.append(entry)
        out.append({"name": m.name, "summary": m.summary, "reference": m.reference, "base": m.base,
                    "models": [m.min_models, m.max_models], "semantics": list(m.semantics), "stats": m.stats_kind,
                    "paths": sorted(m.paths), "params": params})
    return out
