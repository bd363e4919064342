"""streammerge: merge LLM checkpoints (DARE, TIES, task arithmetic) tensor by tensor in bounded memory.

The public names below are imported on first use (PEP 562), so `import streammerge` and the CLI's
`--help` do not pay for torch until something needs it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "MergeResult": "api", "finalize": "api", "merge": "api", "plan": "api",
    "MergeConfig": "config", "ModelSpec": "config",
    "VerifyReport": "verify", "verify": "verify",
    **{name: "errors" for name in (
        "CheckpointError", "CheckpointNotFoundError", "ConfigError", "DeviceError", "MismatchError",
        "NonFiniteError", "OutputError", "StreammergeError", "UnsupportedFeatureError")},
}

__all__ = [
    "MergeConfig", "ModelSpec", "MergeResult", "merge", "finalize", "plan", "verify", "VerifyReport",
    "StreammergeError", "ConfigError", "UnsupportedFeatureError", "CheckpointError",
    "CheckpointNotFoundError", "DeviceError", "MismatchError", "NonFiniteError", "OutputError",
]

if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
    from .api import MergeResult, finalize, merge, plan
    from .config import MergeConfig, ModelSpec
    from .errors import (
        CheckpointError,
        CheckpointNotFoundError,
        ConfigError,
        DeviceError,
        MismatchError,
        NonFiniteError,
        OutputError,
        StreammergeError,
        UnsupportedFeatureError,
    )
    from .verify import VerifyReport, verify


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streammerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`streammerge.plan` and `streammerge.verify` are the functions, as the eager imports made them:
    importing the submodules of those names does not replace them."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
