"""The one error type users see: a single line naming the thing and what would be valid."""


class LongtailError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` on one line and exits 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def unknown(kind: str, name: object, valid) -> LongtailError:
    """``unknown loss 'foo' (valid: ce, focal, mm)``."""
    return LongtailError(f"unknown {kind} {name!r} (valid: {', '.join(sorted(map(str, valid))) or 'none installed'})")


def full_stage_one_error(name: str, epochs: int, start_epoch: int) -> LongtailError:
    """A fine-tune strategy with `after_full_stage_one` under a schedule that stops stage 1 early."""
    return LongtailError(
        f"finetune.strategy={name} re-trains only the classifier after stage 1 has run the whole schedule: "
        f"set finetune.start_epoch to train.epochs ({epochs}), not {start_epoch}")


def ignored_rebalancing_error(name: str, ignored: list[str]) -> LongtailError:
    """finetune.reweighting / finetune.sampler set for a strategy that does not use them (params.yaml's
    default finetune.reweighting is cb, the DRW of LDAM-DRW)."""
    return LongtailError(
        f"finetune.strategy={name} does not use finetune.reweighting / finetune.sampler (its settings are "
        f"finetunes.{name}), so {' and '.join(ignored)} would be silently ignored: set finetune.reweighting=none and "
        f"finetune.sampler=instance (`longtail sweep --method NAME` sets them)")


def n_max_error(dataset: str, n_max: int, available: int) -> LongtailError:
    """data.n_max above the images per class that the source has (the check and the build say it alike)."""
    return LongtailError(f"data.n_max ({n_max}) is more than the {available} images per class that {dataset} has "
                         f"(valid: 1..{available} or auto)")
