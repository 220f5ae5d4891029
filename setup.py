"""The one thing pyproject.toml does not declare: the HPACK decoder's C extension.

(setuptools' ``[tool.setuptools.ext-modules]`` table is still marked experimental, and warns on
every install.) Optional: where no C compiler is found the install still succeeds and the same
decoder runs in Python, slower (csr_service/transport/hpack_decoder.py says why it exists).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "csr_service.transport._hpack",
            sources=["csr_service/transport/_hpack.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
