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
    """The models do not fit together (missing tensors, different shapes or dtypes).

    `problems`: one line each (many tensors of one model may be summed up in one); `details`: every
    tensor on its own line. The message shows the first SHOWN problems and says how to see them all
    (`--json` prints `details` in its error object).
    """

    SHOWN = 3

    def __init__(self, problems: list[str], details: list[str] | None = None):
        self.problems = list(problems)
        self.details = list(details) if details is not None else list(self.problems)
        n = len(self.problems)
        head = f"{n} mismatch(es) between the models: " if n > 1 else ""
        text = head + "; ".join(self.problems[:self.SHOWN])
        if n > self.SHOWN:
            text += f"; ... and {n - self.SHOWN} more"
        if n > self.SHOWN or len(self.details) > n:
            text += f" (all {len(self.details)}, one per tensor: rerun with --json)"
        super().__init__(text)


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
