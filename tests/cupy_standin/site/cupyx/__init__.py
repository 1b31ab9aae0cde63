"""``import cupyx`` with the stand-in's site folder on PYTHONPATH: the stand-in's cupyx."""
from tests.cupy_standin import install as _install

_install()
