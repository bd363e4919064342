"""The compiled CPU kernel (streammerge/methods/ckernel.c), built at install; the metadata is in pyproject.toml.

optional: without a C compiler the install still succeeds, and streammerge merges with its numpy
kernel (the same bytes). -ffp-contract=off: no fused multiply-add, which would change the bits;
-fno-trapping-math: the kernel never reads floating-point exception flags, so the vectorizer may
evaluate both sides of a select (the values are IEEE's either way). Never -ffast-math."""

import os

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "streammerge.methods._ckernel", ["streammerge/methods/ckernel.c"],
    extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off", "-fno-trapping-math"],
    libraries=["m"] if os.name == "posix" else [],  # rintf
    optional=True,
)])
