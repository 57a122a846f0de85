"""The complete, validated description of a training run, saved in every checkpoint.

Importing it loads no torch (the model registry and the data are imported where a config
is checked), so the CLI reads its defaults for the help text from here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from vitdeploy.choices import AUGMENTS, DATA_PLACEMENTS, DEFAULT_MODEL, DEVICES
from vitdeploy.errors import VitDeployError
from vitdeploy.train import recipes

# Options a resumed run may change; every other option is fixed by the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "max_steps", "out", "data_dir", "device", "compile", "log_every", "keep_checkpoints",
                       "eval_batch_size", "test_size", "test_each_epoch", "cache_dir", "decode_workers", "data_placement",
                       "data_memory_mb")


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
    recipe: str = "short"
    crop_padding: int = 0
    augment: str = "none"
    erase_prob: float = 0.0
    mixup: bool = False
    cutmix: bool = False
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    ema: bool = False
    ema_decay: float | None = None  # None: tied to the run's length (see ema.default_decay)
    val_size: int | None = None  # None: 5,000 of CIFAR-10; a tenth of an image folder's train/ (see the data modules)
    test_size: int | None = None  # None: the whole test set; 0: no test pass
    test_each_epoch: bool = False
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
    # image folders (see vitdeploy.imagefolder); none of these changes what a batch holds but store_size and skip_bad_images
    store_size: int | None = None  # None: the model's input size plus a margin (imagefolder.splits.default_store_size)
    skip_bad_images: bool = False
    cache_dir: str | None = None  # None: ROOT/.vitdeploy-cache
    decode_workers: int | None = None  # None: up to 8, one per CPU
    data_placement: str = "auto"
    data_memory_mb: int | None = None  # None: half the free memory of the device
    tome: str | None = None  # fine-tune with token merging: R or R1,R2,... (vitdeploy.tome.parse); None: off

    def __post_init__(self) -> None:
        from vitdeploy.models import get_spec
        from vitdeploy.preprocess import MAX_SIDE
        from vitdeploy.sources import source_of

        # a registry name is checked here; timm:/hf: names when a run starts (a resumed run takes its
        # checkpoint's model description and needs neither the hub cache nor the model folder)
        spec = get_spec(self.model) if source_of(self.model) == "torchvision" else None
        checks = [
            (1 <= self.epochs <= 100_000, f"--epochs must be at least 1 and at most 100000 (got {self.epochs})"),
            (1 <= self.batch_size <= 65_536, f"--batch-size must be at least 1 and at most 65536 (got {self.batch_size})"),
            (1 <= self.grad_accum <= self.batch_size, f"--grad-accum must be in 1..--batch-size (got {self.grad_accum})"),
            (self.batch_size % self.grad_accum == 0, f"--batch-size {self.batch_size} must be divisible by --grad-accum {self.grad_accum}"),
            (0 < self.lr <= 10, f"--lr must be positive and at most 10 (got {self.lr})"),
            (0 <= self.weight_decay <= 10, f"--weight-decay must be in [0, 10] (got {self.weight_decay})"),
            (0 < self.layer_decay <= 1, "--layer-decay must be in (0, 1]"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (0 <= self.warmup_frac < 1, "--warmup-frac must be in [0, 1)"),
            (0 <= self.grad_clip <= 1e6, "--grad-clip must be in [0, 1e6] (0 turns clipping off)"),
            (0 <= self.crop_padding <= MAX_SIDE,
             f"--crop-padding must not be negative nor above {MAX_SIDE} px (got {self.crop_padding}); it is checked against the stored images' size when the run starts"),
            (self.store_size is None or 8 <= self.store_size <= MAX_SIDE, f"--store-size must lie in 8..{MAX_SIDE} px (got {self.store_size})"),
            (self.decode_workers is None or 1 <= self.decode_workers <= 256, f"--decode-workers must lie in 1..256 (got {self.decode_workers})"),
            (self.data_placement in DATA_PLACEMENTS, f"--data-placement must be one of {', '.join(DATA_PLACEMENTS)} (got {self.data_placement})"),
            (self.data_memory_mb is None or 0 <= self.data_memory_mb <= 2**40, f"--data-memory-mb must lie in 0..2**40 (got {self.data_memory_mb})"),
            (self.augment in AUGMENTS, f"--augment must be one of {', '.join(AUGMENTS)} (got {self.augment})"),
            (0 <= self.erase_prob < 1, f"--erase-prob must be in [0, 1) (got {self.erase_prob})"),
            (not self.mixup or 0 < self.mixup_alpha <= 100, f"--mixup-alpha must be positive and at most 100 with --mixup on (got {self.mixup_alpha}); or use --no-mixup"),
            (not self.cutmix or 0 < self.cutmix_alpha <= 100, f"--cutmix-alpha must be positive and at most 100 with --cutmix on (got {self.cutmix_alpha}); or use --no-cutmix"),
            (self.ema_decay is None or 0 < self.ema_decay < 1, f"--ema-decay must be in (0, 1) (got {self.ema_decay})"),
            (self.val_size is None or self.val_size >= 1, f"--val-size must be at least 1 (got {self.val_size})"),
            (self.test_size is None or self.test_size >= 0, f"--test-size must be 0 (no test pass) or more (got {self.test_size})"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.subset is None or self.subset >= 1, "--subset must be at least 1"),
            (self.log_every >= 1, "--log-every must be at least 1"),
            (self.keep_checkpoints >= 0, "--keep-checkpoints must not be negative (0 keeps all)"),
            (self.eval_batch_size is None or self.eval_batch_size >= 1, "--eval-batch-size must be at least 1"),
            (self.device in DEVICES or self.device.startswith("cuda:"), f"--device must be {', '.join(DEVICES)} (got {self.device})"),
            (not (self.pretrained and self.weights), "use either --pretrained or --weights, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise VitDeployError(message)
        self.merging(spec)  # a --tome the model cannot hold is refused before any data loads
        if spec is not None and self.pretrained and not spec.pretrained:
            raise VitDeployError(f"{self.model} has no pretrained weights; drop --pretrained or pass --weights FILE")

    def merging(self, spec: Any) -> Any:
        """The token merging the run trains with (`tome.Merging`, None: off) for the model `spec`
        (None: a timm/hf model not resolved yet: only the value's form is checked)."""
        from vitdeploy import tome

        asked = tome.parse(self.tome)
        if asked == tome.AUTO:
            raise VitDeployError("--tome auto is for export; train with a number of tokens per block, e.g. --tome 8")
        return tome.plan(spec, asked) if spec is not None else None

    @property
    def mixing(self) -> bool:
        return self.mixup or self.cutmix

    def check_ranks(self, world_size: int) -> None:
        """The global batch must split evenly over the ranks and their micro-batches; with mixup
        or cutmix each rank's share must be even (samples mix in fixed pairs of the epoch order)."""
        if self.batch_size % (world_size * self.grad_accum):
            raise VitDeployError(
                f"--batch-size {self.batch_size} is global and must split evenly over {world_size} ranks x "
                f"--grad-accum {self.grad_accum}; choose a multiple of {world_size * self.grad_accum}"
            )
        if self.mixing and (self.batch_size // world_size) % 2:
            raise VitDeployError(
                f"mixup/cutmix pair neighbouring samples, so each of the {world_size} ranks needs an even share of "
                f"--batch-size {self.batch_size}; choose a multiple of {2 * world_size}, or use --no-mixup --no-cutmix"
            )

    @classmethod
    def from_options(cls, model: str, recipe: str | None = None, **options: Any) -> TrainConfig:
        """A config from CLI options; options left as None take the recipe's value or the default.

        `recipe` (auto, short, long; see `vitdeploy models`) supplies every training knob the
        user does not set; config.json records the recipe chosen and every resolved value."""
        from vitdeploy.models import get_spec

        spec = get_spec(model)
        epochs = options.get("epochs")
        if epochs is None and options.get("max_steps") and (recipe or "auto") == "auto":
            epochs = 1  # a few steps are a quick run: the short recipe, not the model's 100-epoch default
        name, settings = recipes.choose(spec, recipe or "auto", epochs)
        defaults = {**settings, "recipe": name, "pretrained": bool(spec.pretrained) and not options.get("weights")}
        values = {k: v for k, v in options.items() if v is not None}
        for key in ("data_dir", "cache_dir"):  # absolute: export, bench and resume read config.json from anywhere
            if key in values:
                values[key] = str(Path(values[key]).absolute())
        return cls(model=model, **{**defaults, **values})

    def recipe_values(self) -> dict[str, Any]:
        """The options a recipe decides, as this config has them."""
        return {name: getattr(self, name) for name in recipes.RECIPE_FIELDS}

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
