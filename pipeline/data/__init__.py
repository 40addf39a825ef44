"""The datasets and imbalance profiles, listed once (params, sweep, sources, profiles and the report read them)."""

DATASETS = ("cifar10", "cifar100", "imagefolder", "digits")
IMBALANCES = ("exp", "step")
# classes and images per class of the sources whose size is fixed (validation builds plugins with these counts)
SOURCE_SIZES = {"cifar10": (10, 5000), "cifar100": (100, 500)}
