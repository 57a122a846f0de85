"""The complete, validated description of a training run, saved in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from vitdeploy.errors import VitDeployError
from vitdeploy.models import DEFAULT_MODEL, get_spec

# Random crops are on by default only for runs of at least this many epochs: shorter runs
# underfit, and crops cost them accuracy (vit_cifar_tiny, 2 epochs on the CPU: 46.77% test
# accuracy with 4 px crops, 52.03% without; README "Training"). Flips are always on.
CROP_MIN_EPOCHS = 10
DEFAULT_CROP_PADDING = 4

# Options a resumed run may change; every other option is fixed by the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "max_steps", "out", "data_dir", "device", "compile", "log_every", "keep_checkpoints", "eval_batch_size")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run. Paths are strings so the record stays plain data."""

    model: str = DEFAULT_MODEL
    data_dir: str = "data"
    out: str = "runs/run"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    label_smoothing: float = 0.1
    warmup_frac: float = 0.05
    grad_clip: float = 1.0
    grad_accum: int = 1
    crop_padding: int = DEFAULT_CROP_PADDING
    val_size: int = 5000
    subset: int | None = None
    max_steps: int | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    pretrained: bool = False
    pretrained_weights: str | None = None
    weights: str | None = None
    download: bool = False
    log_every: int = 20
    keep_checkpoints: int = 2
    eval_batch_size: int | None = None

    def __post_init__(self) -> None:
        spec = get_spec(self.model)
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1 (got {self.epochs})"),
            (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1 (got {self.grad_accum})"),
            (self.batch_size % self.grad_accum == 0, f"--batch-size {self.batch_size} must be divisible by --grad-accum {self.grad_accum}"),
            (self.lr > 0, f"--lr must be positive (got {self.lr})"),
            (self.weight_decay >= 0, "--weight-decay must not be negative"),
            (0 < self.layer_decay <= 1, "--layer-decay must be in (0, 1]"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (0 <= self.warmup_frac < 1, "--warmup-frac must be in [0, 1)"),
            (self.grad_clip >= 0, "--grad-clip must not be negative (0 turns clipping off)"),
            (self.crop_padding >= 0, "--crop-padding must not be negative"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.subset is None or self.subset >= 1, "--subset must be at least 1"),
            (self.log_every >= 1, "--log-every must be at least 1"),
            (self.keep_checkpoints >= 0, "--keep-checkpoints must not be negative (0 keeps all)"),
            (self.eval_batch_size is None or self.eval_batch_size >= 1, "--eval-batch-size must be at least 1"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), f"--device must be auto, cpu or cuda (got {self.device})"),
            (not (self.pretrained and self.weights), "use either --pretrained or --weights, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise VitDeployError(message)
        if self.pretrained and not spec.pretrained:
            raise VitDeployError(f"{self.model} has no pretrained weights; drop --pretrained or pass --weights FILE")

    def check_ranks(self, world_size: int) -> None:
        """The global batch must split evenly over the ranks and their micro-batches."""
        if self.batch_size % (world_size * self.grad_accum):
            raise VitDeployError(
                f"--batch-size {self.batch_size} is global and must split evenly over {world_size} ranks x "
                f"--grad-accum {self.grad_accum}; choose a multiple of {world_size * self.grad_accum}"
            )

    @classmethod
    def from_options(cls, model: str, **options: Any) -> TrainConfig:
        """A config from CLI options; options left as None take the model's recipe or the default."""
        spec = get_spec(model)
        recipe = {
            "epochs": spec.recipe.epochs,
            "batch_size": spec.recipe.batch_size,
            "lr": spec.recipe.lr,
            "weight_decay": spec.recipe.weight_decay,
            "layer_decay": spec.recipe.layer_decay,
            "pretrained": bool(spec.pretrained) and not options.get("weights"),
        }
        values = {k: v for k, v in options.items() if v is not None}
        merged = {**recipe, **values}
        merged.setdefault("crop_padding", DEFAULT_CROP_PADDING if merged["epochs"] >= CROP_MIN_EPOCHS else 0)
        return cls(model=model, **merged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def resumed(self, options: dict[str, Any]) -> TrainConfig:
        """This (saved) config with the options given on a resume applied; fixed ones must agree."""
        changes = {}
        for key, value in options.items():
            if value is None or value == getattr(self, key):
                continue
            if key not in RESUMABLE_OVERRIDES:
                flag = "--" + key.replace("_", "-")
                raise VitDeployError(
                    f"the checkpoint was trained with {flag} {getattr(self, key)}, not {value}; "
                    f"drop {flag} to resume, or start a new run without --resume"
                )
            changes[key] = value
        return TrainConfig.from_dict({**self.to_dict(), **changes})
