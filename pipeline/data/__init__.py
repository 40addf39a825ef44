"""The datasets and imbalance profiles, listed once (params, sweep, sources, profiles and the report read them)."""

DATASETS = ("cifar10", "cifar100", "imagefolder", "digits")
# exp / step: the profile cut from the source (docs/methods.md §1); source: every training image of the
# source, as it is (its own class counts; ratio and data.n_max do not apply)
IMBALANCES = ("exp", "step", "source")
SOURCE_PROFILE = "source"
# classes and images per class of the sources whose size is fixed (validation builds plugins with these counts)
SOURCE_SIZES = {"cifar10": (10, 5000), "cifar100": (100, 500)}
# the image side (px) of the sources whose images all have one size
IMAGE_SIDES = {"cifar10": 32, "cifar100": 32, "digits": 8}


def profile_label(imbalance: str, ratio) -> str:
    """How the profile is named to a user: 'exp r=100', or 'source' (no ratio of its own to set)."""
    return SOURCE_PROFILE if imbalance == SOURCE_PROFILE else f"{imbalance} r={float(ratio):g}"
