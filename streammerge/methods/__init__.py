"""Merge methods, one declaration each (base.py says what a declaration holds).

Importing this package registers every method; `registry.get(name)` finds one.
"""

from . import registry  # noqa: F401
from .base import Method, Param, Rows, TensorCtx, row_sums, run_tensor, total  # noqa: F401
from .registry import all_methods, get, names, register  # noqa: F401

# One line per method file: the import registers its methods.
from . import sce  # noqa: F401
from . import nearswap  # noqa: F401
from . import arcee_fusion  # noqa: F401
from . import ram  # noqa: F401  (ram, ramplus_tl)
