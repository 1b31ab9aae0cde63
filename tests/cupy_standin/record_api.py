"""Record the API surface of the installed CuPy into ``cupy_api.json`` beside this file.

The strict stand-in (``tests/cupy_standin``) offers exactly the names recorded here, so code that
uses a name CuPy lacks (``xp.errstate``, say) fails on the stand-in as it would on a GPU. CuPy
installs and imports without a GPU, so this runs anywhere:

    pip install cupy-cuda12x && python tests/cupy_standin/record_api.py

Re-run it when CuPy changes and commit the new JSON.
"""

from __future__ import annotations

import json
from pathlib import Path


def _public(obj) -> list[str]:
    return sorted(n for n in dir(obj) if not n.startswith("_"))


def _signature(cls) -> str:
    """CuPy's Cython classes carry their constructor signature as the docstring's first line."""
    return (cls.__doc__ or "").strip().splitlines()[0]


def record() -> dict:
    import cupy
    import cupyx

    return {
        "cupy_version": cupy.__version__,
        "cupy": _public(cupy),
        "ndarray": sorted(n for n in dir(cupy.ndarray) if not n.startswith("_") or n in _DUNDERS),
        "ufunc": _public(cupy.add),
        "cupyx": _public(cupyx),
        "random": _public(cupy.random),
        "random.Generator": _public(cupy.random.Generator),
        "cuda": _public(cupy.cuda),
        "cuda.runtime": _public(cupy.cuda.runtime),
        "cuda.Device": _public(cupy.cuda.Device),
        "cuda.Stream": _public(cupy.cuda.Stream),
        "cuda.Event": _public(cupy.cuda.Event),
        "cuda.MemoryPool": _public(cupy.cuda.MemoryPool),
        "cuda.PinnedMemoryPool": _public(cupy.cuda.PinnedMemoryPool),
        "cuda.MemoryHook": _public(cupy.cuda.MemoryHook),
        "cuda.MemoryPointer": _public(cupy.cuda.MemoryPointer),
        "signatures": {
            name: _signature(getattr(cupy, name))
            for name in ("ElementwiseKernel", "ReductionKernel", "RawKernel")
        },
    }


# The special methods whose presence decides behaviour (``__index__`` is absent on CuPy: a 0-d
# device array cannot index a list or size a range).
_DUNDERS = {
    "__array__", "__array_function__", "__array_ufunc__", "__bool__", "__complex__",
    "__cuda_array_interface__", "__dlpack__", "__float__", "__index__", "__int__", "__iter__",
    "__len__", "__matmul__", "__nonzero__",
}


if __name__ == "__main__":
    out = Path(__file__).with_name("cupy_api.json")
    out.write_text(json.dumps(record(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
