"""Merge methods, one declaration each (base.py says what a declaration holds).

Importing this package registers every method; `registry.get(name)` finds one.
"""

from . import registry  # noqa: F401
from .base import Method, Param, Rows, TensorCtx, row_sums, run_tensor, total  # noqa: F401
from .registry import all_methods, get, names, register  # noqa: F401

# One line per method file: the import registers its methods.
from . import model_stock  # noqa: F401
from . import nuslerp  # noqa: F401
from . import multislerp  # noqa: F401
from . import karcher  # noqa: F401
