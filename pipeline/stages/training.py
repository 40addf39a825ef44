"""Stages 2 and 3: pretrain runs epochs [0, finetune.start_epoch); finetune resumes that checkpoint
exactly (lr schedule, momentum buffers, RNG states) for [start_epoch, train.epochs) with the
deferred re-balancing switched on. Both keep a resume file outside DVC's outputs, so a stage that
was killed picks up from its last checkpoint when re-run with the same inputs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import io, registry
from ..build import (augmentation, build_loss, build_model, build_policy, describe_device, device_data,
                     pick_device)
from ..data.store import check_built_with, load_dataset
from ..engine import distributed
from ..engine.precision import cpu_kernels
from ..engine.progress import Progress
from ..engine.trainer import Trainer
from ..errors import LongtailError
from ..params import OPTIONAL, Params

DATASET = Path("data/prepared/dataset.npz")
PRETRAIN = Path("models/pretrain.pt")
FINAL = Path("models/final.pt")
RESUME_DIR = Path(".longtail/resume")
# the params that decide what each stage produces (evaluation-only settings are left out); the
# finetune stage also depends on every strategy's parameters. They are the stage's params in dvc.yaml:
# dataset, imbalance, ratio and data reach a stage only through the dataset file (whose bytes the
# fingerprint hashes), so a data.root that moved (same data) neither re-runs a stage in DVC nor makes
# its checkpoint "other params" here
TRAINING_KEYS = ("loss", "seed", "schedule", "model", "train", "finetune", "losses", "reweightings", "samplers")
STAGE_KEYS = {"pretrain": TRAINING_KEYS, "finetune": (*TRAINING_KEYS, "finetunes")}


def _kind(v) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _count(v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return f"must be an epoch count, got {_kind(v)}"


def _weights(v):
    if not isinstance(v, dict):
        return f"must be a state dict (parameter name -> tensor), got {_kind(v)}"
    # a module's get_extra_state() is saved as '<prefix>_extra_state' and may be any object torch.load reads
    bad = next((k for k, t in v.items() if not isinstance(k, str)
                or not (isinstance(t, torch.Tensor) or k.endswith("_extra_state"))), None)
    if bad is not None:
        return f"must be a state dict (parameter name -> tensor), but {bad!r} holds {_kind(v[bad])}"


def _dict(*keys):
    def check(v):
        if not isinstance(v, dict):
            return f"must be a dict, got {_kind(v)}"
        missing = [k for k in keys if k not in v]
        if missing:
            return f"has no {', '.join(missing)}"
    return check


def _generator_state(v):
    if not isinstance(v, torch.Tensor) or v.dtype != torch.uint8:
        return f"must be a random generator's state (a uint8 tensor), got {_kind(v)}"


def _history(v):
    if not isinstance(v, list):
        return f"must be a list of epoch rows, got {_kind(v)}"
    bad = next((i for i, r in enumerate(v) if not isinstance(r, dict) or _count(r.get("epoch"))), None)
    if bad is not None:
        return f"row {bad} must be a dict with an epoch, got {_kind(v[bad])}"


def _best(v):
    wrong = _dict("epoch", "model")(v)
    if wrong:
        return wrong
    if v["epoch"] != -1 and _count(v["epoch"]):  # -1: no epoch evaluated yet
        return f"epoch {_count(v['epoch'])}"
    if v["model"] is not None and _weights(v["model"]):
        return f"model {_weights(v['model'])}"


# what every checkpoint of the training stages holds (Trainer.state_dict), each with the check of its
# structure and types that io.load_checkpoint runs before anything uses it; whether the weights fit the
# model is `check_fits`, once the model is built
CHECKPOINT = {"epoch": _count, "model": _weights, "optimizer": _dict("state", "param_groups"), "criterion": _dict(),
              "sample_gen": _generator_state, "aug_gen": _generator_state, "history": _history, "best": _best}
CHECKPOINT_KEYS = tuple(CHECKPOINT)
# what evaluate reads of models/final.pt
FINAL_CHECKPOINT = {**{k: CHECKPOINT[k] for k in ("epoch", "model", "history", "best")},
                    "meta": _dict("class_counts", "arch", "in_channels", "head", "model_params")}


def misfit(model, weights: dict) -> str | None:
    """What keeps `weights` from loading into `model` (a strict load_state_dict), or None."""
    own = model.state_dict()
    for k, t in own.items():
        if (k in weights and isinstance(t, torch.Tensor) and isinstance(weights[k], torch.Tensor)
                and tuple(weights[k].shape) != tuple(t.shape)):
            return (f"size mismatch for {k}: {list(weights[k].shape)} in the checkpoint, "
                    f"{list(t.shape)} in the model")
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            return f"{what} {', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"
    return None


def check_fits(model, state: dict, what: str, path: Path, arch: str) -> None:
    """The final and best weights of a checkpoint must fit the model params.yaml builds; else one line
    (before any of them is loaded, so a refused file changes nothing)."""
    for key, weights in (("model", state["model"]), ("best model", state["best"]["model"])):
        wrong = None if weights is None else misfit(model, weights)
        if wrong:
            raise LongtailError(f"{what} {path} is not a longtail checkpoint ({key} does not fit {arch}: {wrong})")


@dataclass
class FinetuneContext:
    """What a `longtail.finetune` strategy gets: the trainer resumed from the pretrain checkpoint
    (model, optimizer, data on the device, the train.*/finetune.* re-balancing policy), the epoch to
    train until, and the callbacks that print progress, log to MLflow and write resume checkpoints.
    A strategy may replace `trainer.model` (e.g. a re-built classifier); it must then update `meta`
    (`head`, ...) so that the evaluate stage can rebuild the model from the checkpoint."""

    params: Params
    trainer: Trainer
    meta: dict
    until: int
    fit_kwargs: dict = field(default_factory=dict)
    log: object = None
    resume: object = None  # () -> None: loads the stage's resume checkpoint, if any, into the trainer

    def fit(self, steps=None, until: int | None = None, **callbacks) -> None:
        """Train with `steps` (an engine.contract.Steps; None = plain training) up to `until`
        (default self.until). Call it after setting up the model and optimizer the steps train: a
        killed run's checkpoint is loaded into them first, so the stage resumes where it stopped.
        `callbacks` (on_epoch, on_batch) replace the stage's own."""
        if self.resume is not None:
            self.resume()
            self.resume = None
        self.trainer.fit(self.until if until is None else until, steps=steps, **{**self.fit_kwargs, **callbacks})


def _inputs(stage: str, p: Params) -> dict:
    """What the stage's result depends on besides the dataset file (stored in each checkpoint, so that
    a mismatch can name the key that differs)."""
    inputs = p.section(*STAGE_KEYS[stage])
    if stage == "pretrain":  # pretrain only runs up to the fine-tune start: one stage 1 serves every strategy
        inputs["finetune"] = {"start_epoch": p.finetune.start_epoch}
    for dotted, default in OPTIONAL.items():  # a key newer than a checkpoint, at its default: as if absent
        section, _, key = dotted.partition(".")
        if isinstance(inputs.get(section), dict) and inputs[section].get(key, default) == default:
            inputs[section].pop(key, None)
    return json.loads(json.dumps(inputs, sort_keys=True, default=str))


def _fingerprint(stage: str, p: Params, dataset: Path) -> str:
    h = hashlib.sha256(stage.encode())
    h.update(json.dumps(_inputs(stage, p), sort_keys=True).encode())
    with open(dataset, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_difference(old: dict, new: dict, prefix: str = "") -> str:
    """'seed: 7 -> 0' for the first key whose value differs, or ''."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}"
    return ""


def check_made_with(state: dict, stage: str, p: Params, dataset: Path, path: Path, what: str) -> None:
    """A checkpoint of `stage` (pretrain.pt, final.pt) must have been made with these params and this
    dataset file; else one line naming the first key that differs and the stage to re-run."""
    if state.get("fingerprint") != _fingerprint(stage, p, dataset):
        diff = _first_difference(state.get("inputs") or {}, _inputs(stage, p))
        raise LongtailError(f"{what} {path} was made with other params or data than params.yaml and {dataset} "
                            f"({diff or 'the dataset differs'}): re-run `dvc repro {stage}`")


def _set_aside(path: Path, why: str) -> None:
    """Move an unusable resume file out of the way (kept for a post-mortem) and say so."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(path, aside)
    print(f"warning: {why}; moved it to {aside} and starting the stage from the beginning", file=sys.stderr)


def setup(p: Params, dataset: Path = DATASET):
    """Everything a training stage needs, built from params: (trainer, meta)."""
    ds = load_dataset(dataset)
    check_built_with(ds, p, dataset)
    device = distributed.local_device(pick_device(p.train.device))
    torch.manual_seed(p.seed)
    counts = ds.class_counts
    loss = build_loss(p, counts).to(device)
    head = loss.head
    model = build_model(p, len(counts), ds.x_train.shape[3], head).to(device)
    init = getattr(loss, "init_classifier", None)  # optional loss hook (pipeline.plugin_kit); a loaded
    if callable(init) and hasattr(model, "classifier"):  # checkpoint (finetune, resume) overwrites it
        init(model.classifier)
    aug = augmentation(p, ds)
    trainer = Trainer(model, loss, device_data(ds, device), p.train, build_policy(p, counts), device,
                      p.seed, aug.pad, aug.flip)
    meta = {"class_counts": counts, "classes": ds.classes, "in_channels": int(ds.x_train.shape[3]),
            "head": head, "arch": p.model_arch, "model_params": p.model_params, "loss": p.loss,
            "pad": aug.pad, "flip": aug.flip, "device": str(device), "world_size": distributed.world()[1],
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": trainer.precision.name, "channels_last": trainer.channels_last}
    return trainer, meta


def _shared_resume_root() -> Path:
    from ..tracking import project_root

    return project_root() / RESUME_DIR


def _resume_dir(fingerprint: str, precision: str) -> Path:
    """Where a stage keeps its resume checkpoint: `.longtail/resume/` of the workspace it runs in
    (the project, or a SLURM job's workspace, which outlives a killed job); in a DVC temp copy
    (`dvc exp run --temp`, queue workers: `<project>/.dvc/tmp/exps/...`), which is deleted when
    the run ends or dies, a folder per fingerprint and resolved precision under the project root's,
    so a re-queued killed experiment resumes (and only in the precision it trained in: `auto`
    resolves by machine and environment; the CPU kernels are not compared, so a resume on another
    CPU continues the run in the same precision, not bit for bit)."""
    from ..tracking import project_root

    if Path.cwd().resolve().is_relative_to(project_root() / ".dvc" / "tmp"):
        return _shared_resume_root() / f"{fingerprint[:16]}-{precision}"
    return RESUME_DIR


@contextlib.contextmanager
def _claimed(folder: Path, stage: str):
    """The resume folder this stage may use. A folder under the project's shared resume root is
    per fingerprint, so two queued experiments with the same params would share it (and the first to
    finish would delete it under the other): the first claims it with a lock file beside it; a second
    one, while the first runs, keeps its checkpoints in its own DVC temp copy instead (it is a
    duplicate: what it would resume is the same run). Other folders are a workspace's, which the
    workspace lock already keeps to one stage. In a distributed run rank 0 claims and every rank
    uses its choice."""
    if folder.parent != _shared_resume_root():
        yield folder
        return
    main = distributed.is_main()
    fh = _claim(folder, stage) if main else None
    choice = RESUME_DIR if main and fh is None else folder  # only rank 0's counts
    used = Path(distributed.from_main(str(choice)))
    if fh is None:
        yield used
        return
    lock = Path(fh.name)
    try:
        yield used
    finally:
        lock.unlink(missing_ok=True)  # removed while still held, so no other process locks a stale file
        fh.close()


def _claim(folder: Path, stage: str):
    """The open, locked lock file of `folder`, or None (and a line saying so) when another live
    process holds it."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.parent / f"{folder.name}.lock"
    while True:
        fh = open(lock, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            print(f"{stage}: another run with the same params ({holder}) uses the resume folder {folder}; "
                  f"this one keeps its resume checkpoint in its own workspace ({RESUME_DIR})", flush=True)
            return None
        try:  # the holder before us may have removed the file as we opened it: then lock the new one
            if os.stat(lock).st_ino == os.fstat(fh.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()
    fh.truncate(0)
    fh.write(f"`longtail {stage}` pid {os.getpid()} in {Path.cwd()}")
    fh.flush()
    return fh

def run(stage: str, p: Params, log=None, dataset: Path = DATASET, pretrain: Path = PRETRAIN,
        final: Path = FINAL, resume_dir: Path | None = None) -> dict:
    if stage not in ("pretrain", "finetune"):
        raise ValueError(stage)
    trainer, meta = setup(p, dataset)
    trainer.stage = stage
    device_line, _, warning = describe_device(trainer.device).partition("\n")  # warning: a GPU torch cannot use
    if warning and distributed.is_main():
        print(f"{stage}: {warning}", file=sys.stderr, flush=True)
    until = p.finetune.start_epoch if stage == "pretrain" else p.train.epochs
    out = pretrain if stage == "pretrain" else final
    fingerprint = _fingerprint(stage, p, dataset)
    with _claimed(resume_dir or _resume_dir(fingerprint, meta["precision"]), stage) as folder:
        resume = folder / f"{stage}.pt"

        if stage == "finetune":
            state = io.load_checkpoint(pretrain, "pretrain checkpoint", "pretrain", require=CHECKPOINT)
            check_made_with(state, "pretrain", p, dataset, pretrain, "pretrain checkpoint")
            check_fits(trainer.model, state, "pretrain checkpoint", pretrain, p.model_arch)
            trainer.load_state_dict(state)

        def load_resume():
            """A killed run's checkpoint, loaded once the model and optimizer it holds are set up (the
            finetune strategy calls it through FinetuneContext.fit, after building its classifier)."""
            if not resume.exists():
                return
            try:
                state = io.load_checkpoint(resume, "resume checkpoint", require=CHECKPOINT)
                if state.get("fingerprint") == fingerprint:
                    check_fits(trainer.model, state, "resume checkpoint", resume, p.model_arch)
            except LongtailError as exc:
                _set_aside(resume, str(exc))
                return
            if state.get("fingerprint") != fingerprint:
                resume.unlink()
                return
            trained_in = (state.get("meta") or {}).get("precision")
            if trained_in != meta["precision"]:  # same params, other arithmetic: not this run's first epochs
                _set_aside(resume, f"{stage}: the resume checkpoint {resume} trained in {trained_in}, this run "
                                   f"resolves to {meta['precision']} (train.precision: {p.train.precision})")
                return
            trainer.load_state_dict(state)
            print(f"{stage}: resuming from {resume} at epoch {trainer.epoch}")
            if log is not None:  # end the killed run; its epochs again, so that this run shows the whole curve
                log.end_killed(state.get("mlflow_run"))
                first = 0 if stage == "pretrain" else p.finetune.start_epoch
                for row in trainer.history:
                    if first <= row["epoch"] < trainer.epoch:
                        log.log_epoch(row)  # as the live epochs: step = epoch from 1

        if stage == "pretrain":
            load_resume()

        main = distributed.is_main()

        inputs = _inputs(stage, p)

        def save(state):
            if main:
                io.save_torch(resume, {**state, "fingerprint": fingerprint, "inputs": inputs, "meta": meta,
                                       "mlflow_run": getattr(log, "run_id", None)})

        def on_epoch(row):
            if main:
                progress.epoch(row)
            if log is not None:
                log.log_epoch(row)

        progress = Progress(stage, trainer.epoch, until, p.train.epochs)  # (finetune: from the stage-1 end)
        if main:
            print(f"{stage}: {device_line}, precision {trainer.precision.reason}, "
                  f"{'channels_last' if trainer.channels_last else 'NCHW'}")
        if log is not None:
            log.set_tags({"longtail.device": meta["device_name"]})
            log.log_params({"resolved.pad": meta["pad"], "resolved.flip": meta["flip"], "resolved.head": meta["head"],
                            "resolved.device": meta["device"], "resolved.precision": meta["precision"],
                            "resolved.channels_last": meta["channels_last"],
                            **({"resolved.cpu_kernels": cpu_kernels()} if meta["device"] == "cpu" else {})})
        fit_kwargs = dict(on_epoch=on_epoch, save=save, checkpoint_every=p.train.checkpoint_every,
                          on_batch=progress.batch if progress.tty and main else None)
        if stage == "pretrain":
            trainer.fit(until, **fit_kwargs)
        else:
            strategy = registry.build("finetune", p.finetune.strategy, params=p.finetune.strategy_params,
                                      param_key=f"finetunes.{p.finetune.strategy}")
            strategy.run(FinetuneContext(p, trainer, meta, until, fit_kwargs, log, load_resume))
        if main:
            io.save_torch(out, {**trainer.state_dict(), "fingerprint": fingerprint, "inputs": inputs, "meta": meta})
            if resume.exists():
                os.unlink(resume)
            # a strategy that trains nothing wrote no checkpoint: its folder may not exist
            if (resume.parent.parent == _shared_resume_root() and resume.parent.is_dir()
                    and not any(resume.parent.iterdir())):
                resume.parent.rmdir()
        ran = [r for r in trainer.history if r["epoch"] >= (0 if stage == "pretrain" else p.finetune.start_epoch)]
        summary = {"epochs_run": len(ran),
                   "images_per_s": sum(r["images_per_s"] for r in ran) / len(ran) if ran else 0.0,
                   "seconds": sum(r["epoch_seconds"] for r in ran)}
        if log is not None and ran:
            log.log_metrics({"mean_images_per_s": summary["images_per_s"], "train_seconds": summary["seconds"]})
        return summary
