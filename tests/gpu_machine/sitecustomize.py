"""Python as on the lent GPU machine: the serve extra's packages (and OpenVINO, which it
lacks too) cannot be imported.

Put this folder first on PYTHONPATH (Python imports `sitecustomize` at start-up) to run a
command the way `scripts/gpu_check.sh` runs there (`../shared/GPU.md`: no fastapi,
starlette, uvicorn, pydantic or python-multipart). The test suite does this for the
gpu/trt collection and the gpu_check smoke, so a top-level import of an optional package
on a GPU path fails CI instead of the GPU window.

pydantic stays importable where the installed typer depends on it (typer 0.2x does; the
GPU machine's older typer does not): hiding it there would break every command, not
reveal a vitdeploy import.
"""

import sys
from importlib import metadata
from importlib.abc import MetaPathFinder

ABSENT = {"fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core", "multipart", "python_multipart", "openvino"}
try:
    if any(r.split(";")[0].strip().startswith("pydantic") for r in metadata.requires("typer") or ()):
        ABSENT -= {"pydantic", "pydantic_core"}
except metadata.PackageNotFoundError:
    pass


class _Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 (the import protocol's signature)
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU machine)", name=name)
        return None


sys.meta_path.insert(0, _Absent())
