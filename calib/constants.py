"""Constants shared across the package (one place, as in timm's ``data/constants.py``)."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Fashion-MNIST training-set statistics on the [0, 1] scale.
FASHION_MNIST_MEAN: tuple[float] = (0.2860,)
FASHION_MNIST_STD: tuple[float] = (0.3530,)

#: Number of equal-width confidence bins used by ECE and reliability diagrams (SPEC §6).
N_BINS: int = 15

#: Default seed of the whole pipeline.
DEFAULT_SEED: int = 0
