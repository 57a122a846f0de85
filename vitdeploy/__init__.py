"""vitdeploy: fine-tune a Vision Transformer on CIFAR-10 and deploy it fast and verified."""

__version__ = "0.1.0"
