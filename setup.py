# cffi's out-of-line API mode needs the cffi_modules keyword, which only setup() takes.
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

SEEDRAND_SRC = os.path.join("sandlock_core", "csrc", "seedrand.c")
SEEDRAND_LIB = os.path.join("sandlock_core", "_seedrand.so")


class BuildExt(build_ext):
    """Also builds sandlock_core/_seedrand.so from csrc/seedrand.c: a plain shared library (libc only, no
    Python) that sandboxes with random_seed preload into their programs (sandlock_core/seedrand.py). Built
    into build_lib like the extension, and next to the sources for in-place and editable builds."""

    def run(self):
        super().run()  # cffi's extension; sets up self.compiler
        objs = self.compiler.compile([SEEDRAND_SRC], output_dir=self.build_temp,
                                     extra_postargs=["-O2", "-fPIC", "-fvisibility=hidden", "-Wall"])
        built = os.path.join(self.build_lib, SEEDRAND_LIB)
        self.compiler.link_shared_object(objs, built, extra_postargs=["-s"])
        if self.inplace:
            self.copy_file(built, SEEDRAND_LIB)


setup(cffi_modules=["sandlock_core/_ffi_build.py:ffibuilder"], cmdclass={"build_ext": BuildExt})
