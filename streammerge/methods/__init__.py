"""Merge methods, one declaration each (base.py says what a declaration holds).

Importing this package registers every method; `registry.get(name)` finds one.
"""

# One line per method file: the import registers its methods.
from streammerge.methods import (
    registry,  # noqa: F401
    slerp,  # noqa: E402,F401
    task_vectors,  # noqa: E402,F401  task_arithmetic, ties, dare_*, breadcrumbs*, della*, linear, passthrough
)
from streammerge.methods.base import (  # noqa: F401
    Method,
    Param,
    Rows,
    TensorCtx,
    row_sums,
    run_tensor,
    total,
)
from streammerge.methods.registry import all_methods, get, names, register  # noqa: F401
