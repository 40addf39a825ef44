"""params.yaml -> validated settings. Every error names the key and the valid values.

Validation runs before any work (each stage validates the whole file, so an inconsistent file fails
in its first stage). `parse` checks every key (an unknown one names the closest valid key), every
number (finite, in range) and the plugin names against the installed entry points (metadata only).
`check_plugins` then binds each plugin section to its plugin's `build` signature and builds the
plugins (with the class counts the data params give: `expected_counts`)."""

from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import registry
from .checks import check_number, check_seed, checking, find_non_finite, params_file, unknown_key, yaml_file
from .data import DATASETS, IMAGE_SIDES, IMBALANCES, SOURCE_COUNTS, SOURCE_PROFILE
from .errors import LongtailError, full_stage_one_error, ignored_rebalancing_error
from .tracking import DEFAULT_EXPERIMENT
DEVICES = ("auto", "cpu", "cuda")
LOADERS = ("device", "reference")
PRECISIONS = ("auto", "fp32", "bf16")
MAX_IMAGE_SIZE = 1024  # data.image_size's limit (one 1024 px RGB image is 3 MB in the prepared dataset)


@dataclass(frozen=True)
class Schedule:
    """A named schedule preset (params.yaml `schedule`). Epoch numbers in train.* and finetune.*
    are written in the 200-epoch protocol's units; a preset maps each one to round(e * scale), and
    sets the warm-up to max(min_warmup, round(warmup * scale)), so that one switch scales the whole
    schedule consistently (LDAM-DRW milestones, DRW start, BBN's milestones, stage 1 of the two-stage
    methods)."""

    scale: float
    min_warmup: int
    about: str

    def epoch(self, e: int) -> int:
        return int(e * self.scale + 0.5)

    def warmup(self, w: int) -> int:
        return 0 if w == 0 else max(self.min_warmup, self.epoch(w))

    def resolve(self, key: str, value):
        """A param's value as this schedule runs it: a number (or list of numbers) under one of
        SCHEDULED_KEYS scaled as `parse` scales it, anything else as written. What lets the report
        name two runs alike when they train alike (BBN's milestones [119, 159] and [120, 160] are both
        [18, 24] under `short`)."""
        if key not in SCHEDULED_KEYS or isinstance(value, bool):
            return value
        one = self.warmup if key == "train.warmup_epochs" else self.epoch
        if isinstance(value, (int, float)):
            return one(value)
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    for v in value):
            return tuple(one(v) for v in value)
        return value


# the params whose values are epoch numbers in the 200-epoch protocol's units: `parse` scales each by
# the schedule (Schedule.epoch; the warm-up by Schedule.warmup)
SCHEDULED_KEYS = ("train.epochs", "train.warmup_epochs", "train.milestones", "finetune.start_epoch")


SCHEDULES = {
    "full": Schedule(1.0, 0, "epoch numbers as written (the 200-epoch LDAM-DRW protocol by default)"),
    "short": Schedule(0.15, 2, "every epoch number x0.15: 30 epochs, warm-up 2, lr x0.01 from 24 and x0.0001 "
                               "from 27, DRW from 24"),
}


@dataclass(frozen=True)
class Data:
    root: str
    n_max: int | None  # None = the source's own per-class count
    image_size: int | None  # None = as the images are (one size); imagefolder: fit each to a square


@dataclass(frozen=True)
class Train:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    warmup_epochs: int
    milestones: tuple[int, ...]
    milestone_factors: tuple[float, ...]
    eval_every: int
    eval_batch_size: int | None  # None = auto (1024 on CUDA, 100 on CPU, where small batches are faster)
    reweighting: str
    sampler: str
    pad: int | None  # None = auto (image side / 8)
    flip: bool | None  # None = auto (as the source allows)
    device: str
    checkpoint_every: int
    compile: bool | None  # None = auto (on for CUDA)
    loader: str  # device (fast path) | reference (PIL + DataLoader, as the LDAM-DRW scripts)
    loader_workers: int
    precision: str = "auto"  # auto | fp32 | bf16 (pipeline/engine/precision.py)
    clip_grad_norm: float | None = None  # max global gradient L2 norm; None = no clipping
    nesterov: bool = False  # Nesterov momentum (BBN's authors train with it)


@dataclass(frozen=True)
class Finetune:
    start_epoch: int
    reweighting: str
    sampler: str
    strategy: str
    strategy_params: dict


@dataclass(frozen=True)
class Params:
    dataset: str
    imbalance: str
    ratio: float
    loss: str
    seed: int
    schedule: str
    data: Data
    model_arch: str
    model_params: dict
    train: Train
    finetune: Finetune
    loss_params: dict
    reweighting_params: dict  # name -> params
    sampler_params: dict  # name -> params
    experiment: str
    raw: dict = field(repr=False, compare=False)
    source: str = field(default="params.yaml", repr=False, compare=False)  # the file, as messages name it

    def section(self, *keys: str) -> dict:
        """The raw values of some top-level keys (what a stage logs as its params)."""
        return {k: copy.deepcopy(self.raw[k]) for k in keys if k in self.raw}


def _get(d: dict, key: str, path: str):
    if not isinstance(d, dict):
        raise LongtailError(f"{path} must be a mapping, got {type(d).__name__}")
    if key not in d:
        prefix = f"{path}." if path else ""
        known = TOP_KEYS if not path else SECTION_KEYS.get(path, ())  # a valid key there is no misspelling
        near = difflib.get_close_matches(key, [str(k) for k in d if k not in known], n=1, cutoff=0.75)
        hint = f" ({prefix}{near[0]} is there: did you mean {prefix}{key}?)" if near else ""
        raise LongtailError(f"missing key {prefix}{key} in {params_file()}{hint}")
    return d[key]


def _int(value, key: str, lo: int | None = None, hi: int | None = None) -> int:
    return check_number(key, value, min=lo, max=hi, integer=True)


def _float(value, key: str, lo: float | None = None, hi: float | None = None, lo_open=False) -> float:
    return check_number(key, value, min=None if lo_open else lo, above=lo if lo_open else None, max=hi)


# keys added after params.yaml files (and runs logged from them) without them: a missing one has this value
OPTIONAL = {"data.image_size": "auto", "train.nesterov": False}
# the keys each fixed section may hold; plugin sections are checked against the installed plugins
TOP_KEYS = ("dataset", "imbalance", "ratio", "loss", "seed", "schedule", "data", "model", "train", "finetune", "losses",
            "reweightings", "samplers", "finetunes", "tracking", "slurm")
SECTION_KEYS = {
    "data": ("root", "n_max", "image_size"),
    "train": tuple(f.name for f in fields(Train)),
    "finetune": ("start_epoch", "reweighting", "sampler", "strategy"),
    "tracking": ("experiment",),
    "slurm": ("partition", "time", "gpus", "cpus", "mem", "parallel", "options"),  # values: pipeline/slurm.py
}
# plugin-parameter sections: params.yaml key -> registry group
PLUGIN_SECTIONS = {"losses": "losses", "reweightings": "reweighting", "samplers": "samplers",
                   "finetunes": "finetune"}


def _check_keys(raw: dict) -> None:
    """Every key of params.yaml is known: a typo names the closest valid key."""
    for key in raw:
        if key not in TOP_KEYS:
            raise unknown_key("", key, TOP_KEYS)
    for section, valid in SECTION_KEYS.items():
        node = raw.get(section)
        if isinstance(node, dict):
            for key in node:
                if key not in valid:
                    raise unknown_key(section, key, valid)
    for section, group in PLUGIN_SECTIONS.items():
        node = raw.get(section)
        if node is None:
            continue
        if not isinstance(node, dict):
            raise LongtailError(f"{section} must be a mapping of plugin name -> parameters")
        installed = registry.names(group)
        for name in node:
            # a section of a plugin that is not installed here is left alone, unless it looks like a typo
            if name not in installed and difflib.get_close_matches(str(name), installed, n=1, cutoff=0.75):
                raise LongtailError(f"{unknown_key(section, name, installed)}; if {section}.{name} is the section "
                                    f"of a plugin not installed here (e.g. one `longtail plugins new` just "
                                    f"wrote), install it first: pip install -e <its folder>")


def _choice(value, key: str, valid) -> str:
    if value not in valid:
        raise LongtailError(f"{key} must be one of {', '.join(valid)}, got {value!r}")
    return value


def _auto(value, key: str, conv):
    if value == "auto":
        return None
    try:
        return conv(value, key)
    except LongtailError as exc:
        if "auto" in str(exc):
            raise
        raise LongtailError(f"{exc} (or auto)") from None


def _bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise LongtailError(f"{key} must be true, false or auto, got {value!r}")
    return value


def _nesterov(value) -> bool:
    if not isinstance(value, bool):
        raise LongtailError(f"train.nesterov must be true or false, got {value!r}")
    return value


def _plugin(group: str, name, key: str) -> str:
    if not isinstance(name, str):
        raise LongtailError(f"{key} must be a plugin name, got {name!r}")
    valid = registry.names(group)
    if name not in valid:
        raise LongtailError(f"{key}: unknown {group} plugin {name!r} (valid: {', '.join(valid) or 'none installed'})")
    registry.check_name(group, name)
    return name


def _plugin_params(raw: dict, group_key: str, name: str) -> dict:
    groups = raw.get(group_key) or {}
    if not isinstance(groups, dict):
        raise LongtailError(f"{group_key} must be a mapping of plugin name -> parameters")
    params = groups.get(name) or {}
    if not isinstance(params, dict):
        raise LongtailError(f"{group_key}.{name} must be a mapping of parameters, got {params!r}")
    return dict(params)


def parse(raw: dict, source: str = "params.yaml") -> Params:
    """Validate a params mapping (as read from params.yaml, or the `source` file that messages name) and
    return typed settings."""
    with checking(source):
        return _parse(raw, source)


def _parse(raw: dict, source: str) -> Params:
    if not isinstance(raw, dict):
        got = "nothing (it is empty)" if raw is None else repr(raw)
        got = got if len(got) <= 60 else f"a {type(raw).__name__}"
        raise LongtailError(f"{source} must be a mapping of keys to values, got {got}")
    bad = find_non_finite(raw)
    if bad:
        raise LongtailError(f"{bad[0]} must be a finite number, got {bad[1]!r}")
    _check_keys(raw)
    dataset = _choice(_get(raw, "dataset", ""), "dataset", DATASETS)
    imbalance = _choice(_get(raw, "imbalance", ""), "imbalance", IMBALANCES)
    ratio = _float(_get(raw, "ratio", ""), "ratio", lo=1)
    seed = check_seed("seed", _get(raw, "seed", ""))
    loss = _plugin("losses", _get(raw, "loss", ""), "loss")

    d = _get(raw, "data", "")
    root = _get(d, "root", "data")
    if not isinstance(root, str) or not root.strip():
        raise LongtailError(f"data.root must be a folder path (e.g. data/raw), got {root!r}")
    data = Data(root=root, n_max=_auto(_get(d, "n_max", "data"), "data.n_max", lambda v, k: _int(v, k, lo=1)),
                image_size=_auto(d.get("image_size", OPTIONAL["data.image_size"]), "data.image_size",
                                 lambda v, k: _int(v, k, lo=1, hi=MAX_IMAGE_SIZE)))
    if data.image_size is not None and dataset != "imagefolder":
        raise LongtailError(f"data.image_size ({data.image_size}) applies to dataset imagefolder only; {dataset} "
                            "has one image size already (valid: auto)")
    if imbalance == SOURCE_PROFILE and data.n_max is not None:
        raise LongtailError(f"data.n_max ({data.n_max}) does not apply to imbalance source, which keeps every "
                            "training image of the source (valid: auto; or imbalance exp / step to cut a profile)")
    if dataset in SOURCE_COUNTS:  # data.n_max and ratio as build-dataset checks them (an image folder's: check_plugins)
        _cut(dataset, data, imbalance, ratio)

    m = _get(raw, "model", "")
    arch = _plugin("models", _get(m, "arch", "model"), "model.arch")
    model_params = {k: v for k, v in m.items() if k != "arch"}

    schedule_name = _choice(raw.get("schedule", "full"), "schedule", tuple(SCHEDULES))
    sched = SCHEDULES[schedule_name]
    t = _get(raw, "train", "")
    written_epochs = _int(_get(t, "epochs", "train"), "train.epochs", lo=1)
    epochs = sched.epoch(written_epochs)
    if epochs < 1:
        raise LongtailError(f"train.epochs ({written_epochs}) gives {epochs} epochs under schedule={schedule_name}; "
                            f"it must give at least 1")
    milestones = _get(t, "milestones", "train")
    factors = _get(t, "milestone_factors", "train")
    if not isinstance(milestones, list):
        raise LongtailError(f"train.milestones must be a list of epoch numbers, got {milestones!r}")
    if not isinstance(factors, list):
        raise LongtailError(f"train.milestone_factors must be a list of lr factors, got {factors!r}")
    if len(milestones) != len(factors):
        raise LongtailError(f"train.milestones and train.milestone_factors must be lists of the same length (one "
                            f"lr factor per milestone), got {len(milestones)} and {len(factors)} values")
    milestones = tuple(sched.epoch(_int(v, f"train.milestones[{i}]", lo=0)) for i, v in enumerate(milestones))
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise LongtailError(f"train.milestones must be strictly increasing, got {list(milestones)}"
                            + (f" (under schedule={schedule_name})" if sched.scale != 1 else ""))
    if milestones and milestones[-1] >= epochs:
        hint = (" (for the 30-epoch protocol keep the 200-epoch numbers and set schedule=short)"
                if schedule_name == "full" else "")
        raise LongtailError(f"train.milestones {list(milestones)} must all be below train.epochs ({epochs}), or the "
                            f"lr never decays there{hint}")
    warmup = _int(_get(t, "warmup_epochs", "train"), "train.warmup_epochs", lo=0, hi=written_epochs)
    factors = tuple(_float(v, f"train.milestone_factors[{i}]", lo=0, lo_open=True) for i, v in enumerate(factors))
    train = Train(
        epochs=epochs,
        batch_size=_int(_get(t, "batch_size", "train"), "train.batch_size", lo=1),
        lr=_float(_get(t, "lr", "train"), "train.lr", lo=0, lo_open=True),
        momentum=_float(_get(t, "momentum", "train"), "train.momentum", lo=0, hi=1),
        weight_decay=_float(_get(t, "weight_decay", "train"), "train.weight_decay", lo=0),
        warmup_epochs=min(sched.warmup(warmup), epochs),
        milestones=milestones,
        milestone_factors=factors,
        eval_every=_int(_get(t, "eval_every", "train"), "train.eval_every", lo=1),
        eval_batch_size=_auto(t.get("eval_batch_size", "auto"), "train.eval_batch_size", lambda v, k: _int(v, k, lo=1)),
        reweighting=_plugin("reweighting", _get(t, "reweighting", "train"), "train.reweighting"),
        sampler=_plugin("samplers", _get(t, "sampler", "train"), "train.sampler"),
        pad=_auto(_get(t, "pad", "train"), "train.pad", lambda v, k: _int(v, k, lo=0)),
        flip=_auto(_get(t, "flip", "train"), "train.flip", _bool),
        device=_choice(t.get("device", "auto"), "train.device", DEVICES),
        checkpoint_every=_int(t.get("checkpoint_every", 10), "train.checkpoint_every", lo=1),
        compile=_auto(t.get("compile", "auto"), "train.compile", _bool),
        loader=_choice(t.get("loader", "device"), "train.loader", LOADERS),
        loader_workers=_int(t.get("loader_workers", 2), "train.loader_workers", lo=0),
        precision=_choice(t.get("precision", "auto"), "train.precision", PRECISIONS),
        clip_grad_norm=(None if t.get("clip_grad_norm") is None
                        else _float(t.get("clip_grad_norm"), "train.clip_grad_norm", lo=0, lo_open=True)),
        nesterov=_nesterov(t.get("nesterov", OPTIONAL["train.nesterov"])),
    )
    if train.pad is not None:
        _check_pad(train.pad, dataset, data.image_size)
    if train.nesterov and train.momentum == 0:
        raise LongtailError("train.nesterov=true needs momentum: set train.momentum above 0 (now 0) or train.nesterov=false")

    f = _get(raw, "finetune", "")
    finetune = Finetune(
        start_epoch=sched.epoch(_int(_get(f, "start_epoch", "finetune"), "finetune.start_epoch", lo=0)),
        reweighting=_plugin("reweighting", _get(f, "reweighting", "finetune"), "finetune.reweighting"),
        sampler=_plugin("samplers", _get(f, "sampler", "finetune"), "finetune.sampler"),
        strategy=(strategy := _plugin("finetune", f.get("strategy", "continue"), "finetune.strategy")),
        strategy_params=_plugin_params(raw, "finetunes", strategy),
    )
    if finetune.start_epoch > epochs:
        raise LongtailError(
            f"finetune.start_epoch ({finetune.start_epoch}) is beyond the last epoch: "
            f"it must be between 0 and train.epochs ({epochs})"
        )
    unused = _not_plain("train", train)
    if finetune.start_epoch == 0 and unused:  # e.g. BBN, which runs the whole schedule as its fine-tune stage
        raise LongtailError(
            f"finetune.start_epoch=0 leaves the train.* re-balancing no epoch, so {' and '.join(unused)} would be "
            f"silently ignored: set train.reweighting=none and train.sampler=instance (finetune.* covers the whole run)")

    tracking = raw.get("tracking") or {}
    experiment = tracking.get("experiment", DEFAULT_EXPERIMENT) if isinstance(tracking, dict) else None
    if not isinstance(experiment, str) or not experiment.strip():
        raise LongtailError(f"tracking.experiment must be an MLflow experiment name, a non-empty string "
                            f"(e.g. {DEFAULT_EXPERIMENT}), got {experiment!r}")

    return Params(
        dataset=dataset,
        imbalance=imbalance,
        ratio=ratio,
        loss=loss,
        seed=seed,
        schedule=schedule_name,
        data=data,
        model_arch=arch,
        model_params=model_params,
        train=train,
        finetune=finetune,
        loss_params=_plugin_params(raw, "losses", loss),
        reweighting_params={n: _plugin_params(raw, "reweightings", n)
                            for n in {train.reweighting, finetune.reweighting}},
        sampler_params={n: _plugin_params(raw, "samplers", n) for n in {train.sampler, finetune.sampler}},
        experiment=experiment,
        raw=copy.deepcopy(raw),
        source=source,
    )


def _check_pad(pad: int, dataset: str, image_size: int | None) -> None:
    """train.pad below the image side: the source's, data.image_size, or else data.image_size's limit."""
    side = IMAGE_SIDES.get(dataset) or image_size or MAX_IMAGE_SIZE
    where = (f"the image side, {side} px for {dataset}" if dataset in IMAGE_SIDES
             else f"the image side, {side} px by data.image_size" if image_size
             else f"{side} px, the largest image side data.image_size fits")
    if pad >= side:
        raise LongtailError(f"train.pad ({pad}) must be below {where} (valid: 0..{side - 1} or auto)")


def experiment_name(raw: dict | None) -> str:
    """tracking.experiment of a params mapping, else the default."""
    tracking = (raw or {}).get("tracking") or {}
    return str(tracking.get("experiment", DEFAULT_EXPERIMENT)) if isinstance(tracking, dict) else DEFAULT_EXPERIMENT


def override(raw: dict, overrides: dict) -> dict:
    """A copy of a params mapping with dotted keys set (``{"train.epochs": 3}``), as `-S` does."""
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        node = raw
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return raw


def _cut(dataset: str, data: Data, imbalance: str, ratio: float, per_class=None, classes=None) -> list[int]:
    """The training images per class these data params cut from the source (`per_class`: its own, else
    the fixed counts of cifar / digits), refused as build-dataset refuses them (data.profiles.profile_counts)."""
    from .data.profiles import profile_counts

    return profile_counts(SOURCE_COUNTS[dataset] if per_class is None else per_class, dataset=dataset,
                          root=data.root, imbalance=imbalance, ratio=ratio, n_max=data.n_max, classes=classes)[0]


def expected_counts(p: Params, prepared: Path = Path("data/prepared/class_counts.json")) -> list[int]:
    """The training images per class these params give, known without building the dataset: a fixed-size
    source's profile follows from the params; an image folder's from its listed files (no image is read),
    or from the prepared dataset when it was built with exactly these data params (its `made_with` record,
    data.root included), so that a stage runs on prepared data whose folder has since gone. Refuses what
    build-dataset would refuse (a missing folder, a ratio or data.n_max the source cannot give), in its words."""
    from .data.store import built_record

    if p.dataset in SOURCE_COUNTS:
        return _cut(p.dataset, p.data, p.imbalance, p.ratio)
    try:
        made = json.loads(prepared.read_text())
        if made["made_with"] == built_record(p):
            return [int(n) for n in made["class_counts"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from .data.sources import list_imagefolder

    classes, train_files, _ = list_imagefolder(p.data.root)
    return _cut(p.dataset, p.data, p.imbalance, p.ratio, [len(f) for f in train_files], classes)


# the re-balancing choices that re-balance nothing (method_names.yaml's `plain`, in both phases)
PLAIN_REBALANCING = {"reweighting": "none", "sampler": "instance"}
# a plugin parameter with one of these names (or ending in _NAME) names a plugin of that group
PLUGIN_REFERENCES = {"sampler": "samplers", "reweighting": "reweighting"}


def _not_plain(phase: str, choice) -> list[str]:
    """`phase.key=value` for each of a phase's re-balancing choices that re-balances something."""
    return [f"{phase}.{k}={getattr(choice, k)}" for k in PLAIN_REBALANCING if getattr(choice, k) != PLAIN_REBALANCING[k]]


def check_plugins(p: Params, class_counts: list[int] | None = None) -> None:
    """Before any work: import every selected plugin, bind every plugin section of params.yaml to its
    plugin's build signature, and build the selected losses, re-weightings, samplers and fine-tune
    strategy (with `class_counts`, else the counts `expected_counts` gives), so that every plugin's own value
    checks run here as in the stage. Errors name the key."""
    with checking(p.source):
        _check_plugins(p, class_counts)


def _check_plugins(p: Params, class_counts: list[int] | None) -> None:
    counts = list(class_counts) if class_counts is not None else expected_counts(p)
    selected = {("losses", p.loss), ("models", p.model_arch), ("finetune", p.finetune.strategy),
                ("reweighting", p.train.reweighting), ("reweighting", p.finetune.reweighting),
                ("samplers", p.train.sampler), ("samplers", p.finetune.sampler)}
    for group, name in sorted(selected):
        registry.load(group, name)
    # a model is cheap to build (resnet32: 0.5M parameters); its build checks its params
    registry.build("models", p.model_arch, len(counts), 3, "linear", params=p.model_params,
                   param_key="model")
    sections = [(section, group, name) for section, group in PLUGIN_SECTIONS.items()
                for name in (p.raw.get(section) or {})]
    sections += [(s, g, n) for s, g in PLUGIN_SECTIONS.items() for g2, n in sorted(selected)
                 if g2 == g and n not in (p.raw.get(s) or {})]  # selected, section absent: defaults
    for section, group, name in sections:
        key = f"{section}.{name}"
        if name not in registry.names(group):
            continue  # a section for a plugin not installed here (typos were caught by parse)
        params = _plugin_params(p.raw, section, name)
        try:
            fn = registry.load(group, name)
        except LongtailError:
            if (group, name) in selected:
                raise
            continue  # a broken plugin nobody selected does not stop this run
        args = () if group == "finetune" else (counts,)
        registry.bind(fn, args, params, key)
        for pkey, value in params.items():
            ref = next((g for suffix, g in PLUGIN_REFERENCES.items()
                        if pkey == suffix or str(pkey).endswith("_" + suffix)), None)
            if ref and isinstance(value, str) and value not in registry.names(ref):
                valid = registry.names(ref)
                match = difflib.get_close_matches(value, valid, n=1)
                raise LongtailError(f"{key}.{pkey}: unknown {ref} plugin {value!r}"
                                    f"{f' (did you mean {match[0]}?)' if match else ''}; valid: {', '.join(valid)}")
        built = registry.build(group, name, *args, params=params, param_key=key)
        if (group, name) == ("finetune", p.finetune.strategy):  # what the selected strategy says of itself
            if getattr(built, "after_full_stage_one", False) and p.finetune.start_epoch != p.train.epochs:
                raise full_stage_one_error(name, p.train.epochs, p.finetune.start_epoch)
            unused = _not_plain("finetune", p.finetune)
            if unused and not getattr(built, "uses_finetune_rebalancing", True):
                raise ignored_rebalancing_error(name, unused)




def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise LongtailError(f"params file {path} not found (run from the project root, or pass --params)")
    return parse(yaml_file(path, f"params file {path}"), str(path))
