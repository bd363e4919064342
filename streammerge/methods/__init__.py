"""Merge methods, one declaration each (base.py says what a declaration holds).

Importing this package registers every method; `registry.get(name)` finds one.
"""
# isort: skip_file

from streammerge.methods import registry  # noqa: F401
from streammerge.methods.base import Method, Param, Rows, TensorCtx, row_sums, run_tensor, total  # noqa: F401
from streammerge.methods.registry import all_methods, get, names, register  # noqa: F401

# One line per method file: the import registers its methods.
from streammerge.methods import task_vectors  # noqa: F401  task_arithmetic, ties, dare_*, breadcrumbs*, della*, linear, passthrough
from streammerge.methods import slerp  # noqa: F401
from streammerge.methods import sce  # noqa: F401
from streammerge.methods import nearswap  # noqa: F401
from streammerge.methods import arcee_fusion  # noqa: F401
from streammerge.methods import ram  # noqa: F401  ram, ramplus_tl
from streammerge.methods import model_stock  # noqa: F401
from streammerge.methods import nuslerp  # noqa: F401
from streammerge.methods import multislerp  # noqa: F401
from streammerge.methods import karcher  # noqa: F401
