"""The datasets and imbalance profiles, listed once (params, sweep, sources, profiles and the report read them)."""

DATASETS = ("cifar10", "cifar100", "imagefolder", "digits")
# exp / step: the profile cut from the source (docs/methods.md §1); source: every training image of the
# source, as it is (its own class counts; ratio and data.n_max do not apply)
IMBALANCES = ("exp", "step", "source")
SOURCE_PROFILE = "source"
# training images per class of the sources whose size is fixed (digits: scikit-learn's bundled 1,797 images less
# 50 test images per class): their profile follows from the params alone, so `longtail check` cuts it (and builds
# the plugins with it) without reading an image; tests/unit/test_sources.py checks them against the sources
SOURCE_COUNTS = {"cifar10": (5000,) * 10, "cifar100": (500,) * 100,
                 "digits": (128, 132, 127, 133, 131, 132, 131, 129, 124, 130)}
# the image side (px) of the sources whose images all have one size
IMAGE_SIDES = {"cifar10": 32, "cifar100": 32, "digits": 8}


def profile_label(imbalance: str, ratio) -> str:
    """How the profile is named to a user: 'exp r=100', or 'source' (no ratio of its own to set)."""
    return SOURCE_PROFILE if imbalance == SOURCE_PROFILE else f"{imbalance} r={float(ratio):g}"
