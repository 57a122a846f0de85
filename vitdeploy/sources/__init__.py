"""Model sources beyond vitdeploy's own registry: timm's ViTs (`timm:NAME`) and Hugging Face
`transformers` ViT/DeiT classifiers (`hf:FOLDER_OR_REPO`).

Each source turns a name into a `models.ModelSpec` (architecture, preprocessing, class
names, where its weights are) and builds the model from that spec, so training, export,
serving and explain treat every model alike. Weights come from local files only: the
Hugging Face cache (`hub_cache`), a folder, or `--weights FILE`; nothing here calls a hub.
Each source's package is an optional extra imported only when a name of that source is used.
"""

from __future__ import annotations

from vitdeploy.errors import VitDeployError

PREFIXES = {"timm": "timm:", "hf": "hf:"}  # source -> how a model name of it begins
EXTRAS = {"timm": "timm", "hf": "transformers"}  # source -> the package its extra installs
MIN_VERSIONS = {"timm": (1, 0, 24), "transformers": (4, 57)}  # the oldest tested (timm < 1.0.22 cannot build on meta)


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
