"""The compiled CPU kernels (streammerge/methods/*.c, one library), built at install; the metadata is in pyproject.toml.

optional: without a C compiler the install still succeeds, and streammerge merges with numpy or
torch (the same bytes). -ffp-contract=off: no fused multiply-add, which would change the bits;
-fno-trapping-math: the kernel never reads floating-point exception flags, so the vectorizer may
evaluate both sides of a select (the values are IEEE's either way). Never -ffast-math."""

import glob
import os

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "streammerge.methods._ckernel", sorted(glob.glob("streammerge/methods/*.c")),  # one file per family of kernels
    depends=["streammerge/methods/ckernel.h"],
    extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off", "-fno-trapping-math"],
    libraries=["m"] if os.name == "posix" else [],  # rintf
    optional=True,
)])
