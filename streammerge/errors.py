"""Typed errors. Each says what was wrong, where (file, tensor, key) and what to do.

Library code raises these; only the CLI turns them into one-line messages and exit codes.
Each class also inherits the matching builtin so callers can catch it either way.
"""

from __future__ import annotations


class StreammergeError(Exception):
    """Base class of every error streammerge raises on purpose."""


class ConfigError(StreammergeError, ValueError):
    """The merge configuration is invalid. Carries every problem found, not just the first."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems: " + "; ".join(self.problems))


class UnsupportedFeatureError(ConfigError):
    """The config asks for something streammerge does not do (yet)."""


class CheckpointError(StreammergeError, ValueError):
    """An input checkpoint is missing, malformed or unsupported."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """An input path does not exist or holds no safetensors checkpoint."""


class MismatchError(StreammergeError, ValueError):
    """The models do not fit together (missing tensors, different shapes or dtypes)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        head = f"{len(self.problems)} mismatch(es) between the models: " if len(self.problems) > 1 else ""
        super().__init__(head + "; ".join(self.problems[:20]) + (" ..." if len(self.problems) > 20 else ""))


class OutputError(StreammergeError, OSError):
    """The output directory cannot be written as asked."""


class WorkerError(StreammergeError, RuntimeError):
    """Another worker of a split merge failed; names its rank and reason."""


class DeviceError(StreammergeError, RuntimeError):
    """The GPU failed the merge (out of memory); says which tensor and what to change."""


class NonFiniteError(StreammergeError, ValueError):
    """A tensor holds NaN or Inf (found by the optional finite check)."""


class MissingDependencyError(StreammergeError, ImportError):
    """An optional dependency is needed for what was asked (the message says what to install)."""


class HubError(StreammergeError, OSError):
    """The Hugging Face Hub refused or failed a request (access, network, upload), or its cache cannot be used."""
