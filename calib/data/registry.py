"""Dataset registry: classes, channels, normalisation statistics and raw files per dataset."""

from __future__ import annotations

from dataclasses import dataclass

from calib.constants import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD
from calib.data.sources import CHECKSUMS, FASHION_MNIST_FILES, PAYLOAD_CHECKSUMS, SOURCES, Source

#: The official splits every dataset offers through :func:`calib.data.load_split`.
SPLITS: tuple[str, ...] = ("train", "test")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
#: GTSRB ships class ids (folders 00000..00042) only; these are the benchmark's sign names.
GTSRB_CLASSES: tuple[str, ...] = (
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)",
    "Speed limit (60km/h)", "Speed limit (70km/h)", "Speed limit (80km/h)",
    "End of speed limit (80km/h)", "Speed limit (100km/h)", "Speed limit (120km/h)",
    "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution",
    "Dangerous curve to the left", "Dangerous curve to the right", "Double curve", "Bumpy road",
    "Slippery road", "Road narrows on the right", "Road work", "Traffic signals", "Pedestrians",
    "Children crossing", "Bicycles crossing", "Beware of ice/snow", "Wild animals crossing",
    "End of all speed and passing limits", "Turn right ahead", "Turn left ahead", "Ahead only",
    "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons",
)
#: The folder names of ``101_ObjectCategories`` in sorted order, without ``BACKGROUND_Google``
#: (not a real class): the same classes and indices as torchvision's ``Caltech101``.
CALTECH101_CLASSES: tuple[str, ...] = (
    "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor", "ant",
    "barrel", "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha",
    "butterfly", "camera", "cannon", "car_side", "ceiling_fan", "cellphone", "chair",
    "chandelier", "cougar_body", "cougar_face", "crab", "crayfish", "crocodile",
    "crocodile_head", "cup", "dalmatian", "dollar_bill", "dolphin", "dragonfly",
    "electric_guitar", "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo",
    "flamingo_head", "garfield", "gerenuk", "gramophone", "grand_piano", "hawksbill",
    "headphone", "hedgehog", "helicopter", "ibis", "inline_skate", "joshua_tree", "kangaroo",
    "ketch", "lamp", "laptop", "llama", "lobster", "lotus", "mandolin", "mayfly", "menorah",
    "metronome", "minaret", "nautilus", "octopus", "okapi", "pagoda", "panda", "pigeon", "pizza",
    "platypus", "pyramid", "revolver", "rhino", "rooster", "saxophone", "schooner", "scissors",
    "scorpion", "sea_horse", "snoopy", "soccer_ball", "stapler", "starfish", "stegosaurus",
    "stop_sign", "strawberry", "sunflower", "tick", "trilobite", "umbrella", "watch",
    "water_lilly", "wheelchair", "wild_cat", "windsor_chair", "wrench", "yin_yang",
)


@dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline needs to know about a dataset before reading it.

    Attributes:
        name: registry key; the raw files live in ``root/<name>/``.
        title: the dataset's usual name, for messages and figures.
        num_classes: number of classes K.
        in_chans: channels of the native images (1 grayscale, 3 RGB).
        native_size: side of the native square images, or None when sizes vary (GTSRB,
            Caltech-101: :func:`calib.data.load_split` then needs ``img_size``).
        mean, std: per-channel statistics for the normalisation inside the model (Fashion-MNIST
            statistics for Fashion-MNIST, ImageNet statistics for the others, as in the paper).
        class_names: the K class names, index = label.
        raw_files: paths (files or folders, relative to ``root/<name>/``) that must exist after
            :func:`calib.data.fetch`.
        homepage: where the dataset is published.
        in_memory: whether the whole dataset is read into memory as uint8 (else images are
            decoded from disk on access).
    """

    name: str
    title: str
    num_classes: int
    in_chans: int
    native_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    raw_files: tuple[str, ...]
    homepage: str
    in_memory: bool

    @property
    def checksums(self) -> dict[str, str]:
        """Published MD5 per raw file (from :data:`CHECKSUMS`)."""
        return dict(CHECKSUMS[self.name])

    @property
    def payload_checksums(self) -> dict[str, str]:
        """MD5 of the decompressed content per gzip file (from :data:`PAYLOAD_CHECKSUMS`)."""
        return dict(PAYLOAD_CHECKSUMS.get(self.name, {}))

    @property
    def sources(self) -> tuple[Source, ...]:
        """Download sources (from :data:`SOURCES`)."""
        return SOURCES[self.name]

    def stats(self, in_chans: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) for a model with ``in_chans`` input channels (grayscale stats repeated)."""
        c = check_in_chans(in_chans, self)
        if c == len(self.mean):
            return self.mean, self.std
        return self.mean * c, self.std * c


DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist", title="Fashion-MNIST", num_classes=10, in_chans=1, native_size=28,
        mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, class_names=FASHION_MNIST_CLASSES,
        raw_files=FASHION_MNIST_FILES,
        homepage="https://github.com/zalandoresearch/fashion-mnist", in_memory=True),
    "cifar10": DatasetInfo(
        name="cifar10", title="CIFAR-10", num_classes=10, in_chans=3, native_size=32,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=CIFAR10_CLASSES,
        raw_files=tuple(CHECKSUMS["cifar10"]),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html", in_memory=True),
    "cifar100": DatasetInfo(
        name="cifar100", title="CIFAR-100", num_classes=100, in_chans=3, native_size=32,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=CIFAR100_CLASSES,
        raw_files=tuple(CHECKSUMS["cifar100"]),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html", in_memory=True),
    "gtsrb": DatasetInfo(
        name="gtsrb", title="GTSRB", num_classes=43, in_chans=3, native_size=None,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=GTSRB_CLASSES,
        raw_files=("GTSRB/Training", "GTSRB/Final_Test/Images", "GT-final_test.csv"),
        homepage="https://benchmark.ini.rub.de/gtsrb_dataset.html", in_memory=False),
    "caltech101": DatasetInfo(
        name="caltech101", title="Caltech-101", num_classes=101, in_chans=3, native_size=None,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=CALTECH101_CLASSES,
        raw_files=("101_ObjectCategories",), homepage="https://data.caltech.edu/records/20086",
        in_memory=False),
    "svhn": DatasetInfo(
        name="svhn", title="SVHN", num_classes=10, in_chans=3, native_size=32,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=tuple(str(d) for d in range(10)),
        raw_files=tuple(CHECKSUMS["svhn"]), homepage="http://ufldl.stanford.edu/housenumbers/",
        in_memory=True),
}


def get_info(name: str) -> DatasetInfo:
    """The registry entry of dataset ``name``; ValueError naming the allowed names otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def check_in_chans(in_chans: int | None, info: DatasetInfo | None = None,
                   native: int | None = None) -> int:
    """The output channels for ``in_chans`` (None: the native ones); ValueError if invalid.

    Args:
        in_chans: requested channels, 1 or 3, or None for the native channels.
        info: the dataset whose native channels apply; else ``native`` is used.
        native: native channels (1 grayscale, 3 RGB) of images not from the registry.
    """
    native = info.in_chans if info is not None else native
    if in_chans is None:
        if native is None:
            raise ValueError("in_chans must be 1 or 3, got None")
        return native
    if isinstance(in_chans, bool) or in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3 (or None for the native channels), "
                         f"got {in_chans!r}")
    if native == 3 and in_chans == 1:
        raise ValueError("in_chans=1 needs grayscale images; these are RGB (use in_chans=3)")
    return in_chans
