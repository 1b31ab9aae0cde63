"""``import cupy`` in a process with this folder on PYTHONPATH gives the strict stand-in
(tests/cupy_standin): the GPU code path, run on NumPy. See tests.cupy_standin.subprocess_env."""
from tests.cupy_standin import install as _install

_install()
