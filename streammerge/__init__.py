"""streammerge: merge LLM checkpoints (DARE, TIES, task arithmetic) tensor by tensor in bounded memory."""

__version__ = "0.1.0"

from streammerge.errors import (  # noqa: E402
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
from streammerge.front.api import MergeResult, finalize, merge, plan  # noqa: E402
from streammerge.front.config import MergeConfig, ModelSpec  # noqa: E402
from streammerge.io.verify import VerifyReport, verify  # noqa: E402

__all__ = [
    "MergeConfig", "ModelSpec", "MergeResult", "merge", "finalize", "plan", "verify", "VerifyReport",
    "StreammergeError", "ConfigError", "UnsupportedFeatureError", "CheckpointError",
    "CheckpointNotFoundError", "DeviceError", "MismatchError", "NonFiniteError", "OutputError",
]
