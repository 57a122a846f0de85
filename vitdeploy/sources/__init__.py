"""Model sources beyond vitdeploy's own registry: timm's ViTs (`timm:NAME`) and Hugging Face
`transformers` ViT/DeiT classifiers (`hf:FOLDER_OR_REPO`).

Each source turns a name into a `models.ModelSpec` (architecture, preprocessing, class
names, where its weights are) and builds the model from that spec, so training, export,
serving and explain treat every model alike. Weights come from local files only: the
Hugging Face cache (`hub_cache`), a folder, or `--weights FILE`; nothing here calls a hub.
Each source's package is an optional extra imported only when a name of that source is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitdeploy.errors import VitDeployError

PREFIXES = {"timm": "timm:", "hf": "hf:"}  # source -> how a model name of it begins
EXTRAS = {"timm": "timm", "hf": "transformers"}  # source -> the package its extra installs
MIN_VERSIONS = {"timm": (1, 0, 24), "transformers": (4, 57)}  # the oldest tested (timm < 1.0.22 cannot build on meta)
CONFIG_BYTES = 4 << 20  # a model configuration larger than this is not one


def source_of(name: str) -> str:
    """"torchvision" for a registry name, else the source its prefix names."""
    for source, prefix in PREFIXES.items():
        if name.startswith(prefix):
            if not name[len(prefix):].strip():
                raise VitDeployError(f"{name!r} names no model; write {prefix}NAME (see `vitdeploy models`)")
            return source
    return "torchvision"


def import_extra(source: str):  # noqa: ANN201 - the module of the source's package
    """The source's package, or one clear error naming the extra that installs it."""
    import importlib

    package = EXTRAS[source]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise VitDeployError(f"{source}: models need the {package} package; install it with "
                             f"pip install 'vitdeploy[{source}]'") from None
    if _version(getattr(module, "__version__", "0")) < MIN_VERSIONS[package]:
        wanted = ".".join(map(str, MIN_VERSIONS[package]))
        raise VitDeployError(f"{source}: models need {package} >= {wanted} (found {module.__version__}); "
                             f"pip install -U 'vitdeploy[{source}]'")
    return module


def _version(text: str) -> tuple[int, ...]:
    """The leading numbers of a version string ("1.0.31.dev0" -> (1, 0, 31), "5.0.0rc1" -> (5, 0, 0))."""
    import re

    numbers = []
    for part in text.split(".")[:3]:
        leading = re.match(r"\d+", part)
        if leading is None:
            break
        numbers.append(int(leading.group()))
    return tuple(numbers)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a model folder, refused when oversized or malformed."""
    try:
        if path.stat().st_size > CONFIG_BYTES:
            raise VitDeployError(f"{what} {path} is larger than {CONFIG_BYTES >> 20} MiB; it is not a model configuration")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise VitDeployError(f"{what} {path} is unreadable or not JSON ({str(exc)[:120]}); use an intact model folder") from None
    if not isinstance(data, dict):
        raise VitDeployError(f"{what} {path} is not a JSON object; use an intact model folder")
    return data


def channel_values(value: Any, default: tuple[float, float, float], where: str) -> tuple[float, float, float]:
    """Three per-channel numbers (mean or std) from a model's configuration, or its one error."""
    if value is None:
        return default
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 3:
        raise VitDeployError(f"{where} holds {str(value)[:60]!r} where 3 per-channel numbers belong; use an intact model folder")
    return numbers  # type: ignore[return-value]
