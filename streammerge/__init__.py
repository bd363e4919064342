"""streammerge: merge LLM checkpoints (DARE, TIES, task arithmetic) tensor by tensor in bounded memory.

The public names below are imported on first use (PEP 562), so `import streammerge` and the CLI's
`--help` do not pay for torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "MergeResult": "front.api", "finalize": "front.api", "merge": "front.api", "plan": "front.api",
    "MergeConfig": "front.config", "ModelSpec": "front.config",
    "VerifyReport": "io.verify", "verify": "io.verify",
    "extract_lora": "pipeline.extract", "ExtractOptions": "pipeline.extract", "ExtractResult": "pipeline.extract",
    **{name: "errors" for name in (
        "CheckpointError", "CheckpointNotFoundError", "ConfigError", "DeviceError", "MismatchError",
        "NonFiniteError", "OutputError", "StreammergeError", "UnsupportedFeatureError")},
}

__all__ = [
    "MergeConfig", "ModelSpec", "MergeResult", "merge", "finalize", "plan", "verify", "VerifyReport",
    "extract_lora", "ExtractOptions", "ExtractResult",
    "StreammergeError", "ConfigError", "UnsupportedFeatureError", "CheckpointError",
    "CheckpointNotFoundError", "DeviceError", "MismatchError", "NonFiniteError", "OutputError",
]

if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
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
    from .front.api import MergeResult, finalize, merge, plan
    from .front.config import MergeConfig, ModelSpec
    from .io.verify import VerifyReport, verify
    from .pipeline.extract import ExtractOptions, ExtractResult, extract_lora


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streammerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

