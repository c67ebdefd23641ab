# cffi's out-of-line API mode needs the cffi_modules keyword, which only setup() takes.
from setuptools import setup

setup(cffi_modules=["sandlock_core/_ffi_build.py:ffibuilder"])
