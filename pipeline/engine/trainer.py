"""The training loop: plain, explicit and resumable (a checkpoint holds model, optimizer, epoch,
RNG states, history and the best-epoch weights, so a run split into pretrain + finetune equals
one uninterrupted run).

The whole training set lives on the device as one uint8 tensor; samplers give index tensors;
augmentation and normalisation run batched on the device. The trainer receives objects (model,
criterion, a per-epoch re-balancing policy), never method names."""

from __future__ import annotations

import copy
import sys
import time
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..data.augment import augment, normalize
from ..errors import LongtailError
from ..plugin_kit import EXTRA_INPUTS
from . import distributed
from .precision import resolve as resolve_precision
from .contract import StepResult, Steps, sample_order
from .inference import batched
from .schedule import lr_at


def eval_batch_size(value: int | None, device: torch.device) -> int:
    """train.eval_batch_size, with auto = 1024 on CUDA and 100 on CPU (CPU: 1316 img/s at 100 vs
    488 img/s at 1024 for ResNet-32 on 32x32, `longtail bench` machine, 2 cores)."""
    return value or (1024 if device.type == "cuda" else 100)


@dataclass
class Rebalance:
    """What re-balancing is active in one epoch: per-class loss weights (or None) and a sampler."""

    class_weight: torch.Tensor | None
    sampler: object


@dataclass
class DeviceData:
    x_train: torch.Tensor  # uint8 [N, C, H, W] on the device
    y_train: torch.Tensor  # int64 [N] on the device
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: torch.Tensor  # [C] on the device
    std: torch.Tensor
    host_images: object = None  # numpy uint8 [N, H, W, C] train images, for the reference loader
    y_train_cpu: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.y_train_cpu = self.y_train.cpu()


def loss_extra_inputs(criterion) -> tuple[str, ...]:
    """The optional ``loss.extra_inputs`` (the loss contract in pipeline.plugin_kit): a subset of
    "features" (the classifier's input [B, D]) and "weight" (its weight [C, D])."""
    extra = tuple(getattr(criterion, "extra_inputs", ()) or ())
    bad = [k for k in extra if k not in EXTRA_INPUTS]
    if bad:
        raise LongtailError(f"loss.extra_inputs {bad} unknown (valid: {', '.join(EXTRA_INPUTS)})")
    return extra


def check_loss_output(criterion, loss, logits: torch.Tensor, stage: str) -> None:
    """The loss contract (pipeline.plugin_kit): the batch mean, a floating-point scalar tensor differentiable
    w.r.t. the logits. Checked on every call (a few attribute reads, no device sync), so a loss that returns
    one value per sample or a detached number is one line naming the plugin at the first batch, before any
    update or checkpoint; its finiteness is `Trainer.check_finite`'s."""
    if not isinstance(loss, torch.Tensor):
        got = f"a {type(loss).__name__}, not a tensor"
    elif loss.ndim != 0 or not loss.is_floating_point():
        got = f"a {str(loss.dtype).removeprefix('torch.')} tensor of shape {list(loss.shape)}"
    elif logits.requires_grad and not loss.requires_grad:
        got = "a tensor without a gradient (detached from the logits)"
    else:
        return
    from .. import registry

    raise LongtailError(f"{stage}: {registry.describe(criterion)} returned {got} from forward(logits, target, "
                        f"class_weight); a loss must return the batch mean: a float scalar (shape []) "
                        f"differentiable w.r.t. the logits")


class NonFiniteLoss(LongtailError):
    """Training produced a non-finite loss or logits; the run stops before the next update."""


class Trainer:
    def __init__(self, model, criterion, data: DeviceData, cfg, policy: Callable[[int], Rebalance],
                 device: torch.device, seed: int, pad: int, flip: bool, stage: str = "train"):
        cfg = replace(cfg, eval_batch_size=eval_batch_size(cfg.eval_batch_size, device))
        self.model, self.criterion, self.data, self.cfg = model, criterion, data, cfg
        self.stage = stage  # named in errors
        self.policy, self.device, self.pad, self.flip = policy, device, pad, flip
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        self.sample_gen = torch.Generator().manual_seed(seed)  # epoch orders (CPU)
        self.aug_gen = torch.Generator(device=device).manual_seed(seed + 1)  # crops and flips
        self.epoch = 0  # next epoch to run
        self.history: list[dict] = []
        self.best = {"epoch": -1, "test_acc": -1.0, "model": None}
        self.extra_inputs = loss_extra_inputs(criterion)
        self.steps: Steps | None = None  # what the running fit trains with
        self.pending_steps_state = None
        self.precision = resolve_precision(cfg.precision, device.type)
        self.channels_last = self.precision.channels_last
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.seed = seed
        self.rank, self.world = distributed.world()
        self.net = model  # what the training step calls: the model, DDP-wrapped under torchrun
        if self.world > 1:
            if self.extra_inputs:
                raise LongtailError(f"a loss with extra_inputs {self.extra_inputs} cannot run under torchrun yet; "
                                    "run it in one process")
            self.net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        compile_on = cfg.compile if cfg.compile is not None else device.type == "cuda"
        self.compiled = torch.compile(self.net) if compile_on else None

    def forward(self, x):
        """The training forward: compiled when train.compile asks for it, else (or on failure) eager."""
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as exc:  # a missing compiler toolchain, an unsupported op...
                print(f"warning: torch.compile failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
                      "training without it", file=sys.stderr)
                self.compiled = None
        return self.net(x)

    def autocast(self):
        """bf16 autocast when train.precision resolves to bf16 (the loss is computed in float32
        outside it, and heads compute their logits in float32); a no-op in fp32."""
        if self.precision.name == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return _nullcontext()

    def check_finite(self, loss: torch.Tensor, logits: torch.Tensor, epoch: int, step: int) -> None:
        """Stop at the first non-finite loss or logits, naming stage, epoch (1-based, as printed),
        step and loss, before the optimizer applies the update."""
        if bool(torch.isfinite(loss).all()) and bool(torch.isfinite(logits).all()):
            return
        what = "loss" if not bool(torch.isfinite(loss).all()) else "logits"
        raise NonFiniteLoss(f"{self.stage}: non-finite {what} at epoch {epoch + 1}, step {step + 1} (loss "
                            f"{loss.detach().float().mean().item()}); stopped without writing the stage output; "
                            f"the last good resume checkpoint is kept (try a lower train.lr or train.clip_grad_norm)")

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer update from a float32 loss: backward, optional gradient-norm clipping, step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
        self.optimizer.step()

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "criterion": self.criterion.state_dict(),
            "sample_gen": self.sample_gen.get_state(),
            "aug_gen": self.aug_gen.get_state(),
            "history": self.history,
            "best": self.best,
            "steps": self.steps.state_dict() if hasattr(self.steps, "state_dict") else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.criterion.load_state_dict(state["criterion"])
        self.sample_gen.set_state(state["sample_gen"])
        self.aug_gen.set_state(state["aug_gen"])
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.pending_steps_state = state.get("steps")  # handed to the steps of the next fit

    # -- one epoch -------------------------------------------------------------------------------
    def _logits(self, x):
        if self.extra_inputs:  # the loss also reads the classifier's input; the head runs in float32
            feats = self.model.features(x).float()
            with torch.autocast(x.device.type, enabled=False):
                return self.model.classifier(feats), feats
        return self.forward(x), None

    def augment(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """The training augmentation (random crop with the stage's padding, flip) of a uint8 batch,
        drawn from `aug_gen`."""
        return augment(x_uint8, self.pad, self.flip, self.aug_gen)

    def infer(self, fn: Callable, x_uint8: torch.Tensor, transform: Callable | None = None,
              batch_size: int | None = None):
        """fn(normalised batch) over uint8 images in evaluation-size batches (or `batch_size`),
        concatenated (None for no image): the batched inference loop with this trainer's
        normalisation, precision and memory format; `transform` (e.g. `augment`) runs on each uint8
        batch first."""
        d = self.data
        return batched(fn, x_uint8, d.mean, d.std, batch_size or self.cfg.eval_batch_size, self.autocast,
                       self.channels_last, transform)

    def prepare(self, idx: torch.Tensor, pad_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Training images at `idx`, augmented (crop padding x `pad_scale`, per sample, where given)
        and normalised, in the trainer's memory format."""
        d = self.data
        x = self.augment(d.x_train[idx])
        if pad_scale is not None:
            for scale in sorted(set(pad_scale.tolist()) - {1}):
                other = augment(d.x_train[idx], int(scale * self.pad), self.flip, self.aug_gen)
                x = torch.where((pad_scale == scale)[:, None, None, None], other, x)
        x = normalize(x, d.mean, d.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _batches(self, order: torch.Tensor, pad_scale, epoch: int):
        """Normalised global batches (x, y) in the sampler's order: device-resident data with batched
        augmentation (train.loader = device), or the PIL + DataLoader reference pipeline."""
        cfg, d = self.cfg, self.data
        if cfg.loader == "reference":
            from .reference_loader import loader

            for x, y in loader(d.host_images, d.y_train_cpu.numpy(), order.cpu(), cfg.batch_size, self.pad,
                               self.flip, d.mean.tolist(), d.std.tolist(), cfg.loader_workers,
                               self.seed * 100003 + epoch):
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return
        for start in range(0, len(order), cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            yield self.prepare(order[sl], None if pad_scale is None else pad_scale[sl]), d.y_train[order[sl]]

    def loss(self, logits, y, weight=None, feats=None):
        """The configured loss plugin on float32 logits (class weights optional); a loss that declares
        extra_inputs also gets the classifier's input features and weight."""
        extra = {"features": feats, "weight": self.model.classifier.weight} if self.extra_inputs else {}
        loss = self.criterion(logits, y, class_weight=weight, **{k: extra[k] for k in self.extra_inputs})
        check_loss_output(self.criterion, loss, logits, self.stage)
        return loss

    def reset_best(self) -> None:
        """Best-epoch tracking restarts (e.g. a stage 2 with a new classifier)."""
        self.best = {"epoch": -1, "test_acc": -1.0, "model": None}

    def run_epoch(self, epoch: int, steps: Steps, on_batch: Callable | None = None) -> dict:
        """One epoch of `steps`: the history row (without test_acc)."""
        lr = steps.lr(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if hasattr(self.criterion, "set_epoch"):
            self.criterion.set_epoch(epoch, self.cfg.epochs)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        n, start = 0, time.perf_counter()
        batches = list(steps.batches(epoch)) if on_batch is not None else steps.batches(epoch)
        total = len(batches) if on_batch is not None else None
        for i, batch in enumerate(batches):
            out = steps.loss(batch)
            self.check_finite(out.loss, out.logits, epoch, i)
            self.step(out.loss)
            loss_sum += out.loss.detach() * out.count
            correct += out.correct
            n += out.count
            if on_batch is not None:
                on_batch(i + 1, total)
        if self.world > 1:
            count = torch.tensor(float(n), device=self.device)
            for total_ in (loss_sum, correct, count):
                distributed.all_reduce_sum(total_)
            n = int(count.item())
        seconds = time.perf_counter() - start
        images = n * getattr(steps, "images_per_sample", 1)
        return {"epoch": epoch, "lr": lr, "train_loss": loss_sum.item() / max(n, 1),
                "train_acc": correct.item() / max(n, 1), "images_per_s": images / max(seconds, 1e-9),
                "epoch_seconds": seconds, "reweighted": bool(getattr(steps, "reweighted", False))}

    @torch.no_grad()
    def predict(self, x_uint8: torch.Tensor, model=None) -> torch.Tensor:
        model = model or self.model
        model.eval()
        return self.infer(lambda x: model(x).argmax(1), x_uint8)

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, until: int, on_epoch: Callable[[dict], None] | None = None,
            save: Callable[[dict], None] | None = None, checkpoint_every: int = 1,
            on_batch: Callable | None = None, steps: Steps | None = None) -> None:
        """Run epochs [self.epoch, until) of `steps` (default: plain training under the re-balancing
        policy, `PolicySteps`); evaluate every `eval_every` epochs and at the last one; keep history
        and best; hand a checkpoint (with the steps' own state) to `save` every `checkpoint_every`."""
        steps = steps or PolicySteps(self)
        self.steps = steps
        if self.pending_steps_state is not None and hasattr(steps, "load_state_dict"):
            steps.load_state_dict(self.pending_steps_state)
        self.pending_steps_state = None
        while self.epoch < until:
            e = self.epoch
            row = self.run_epoch(e, steps, on_batch)
            last = e == self.cfg.epochs - 1 or e == until - 1
            if (e + 1) % self.cfg.eval_every == 0 or last:
                pred = self.predict(self.data.x_test)
                acc = (pred == self.data.y_test).float().mean().item()
                row["test_acc"] = acc
                if acc > self.best["test_acc"]:
                    self.best = {"epoch": e, "test_acc": acc,
                                 "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}
            self.history.append(row)
            self.epoch = e + 1
            if on_epoch is not None:
                on_epoch(row)
            if save is not None and (self.epoch % checkpoint_every == 0 or self.epoch == until):
                save(self.state_dict())


class PolicySteps:
    """Plain training (the `Steps` of pretraining and of `continue`): the protocol lr schedule, the
    epoch's re-balancing policy (class weights and sampler), the trainer's forward and loss. A
    sampler may hand per-sample crop-padding multipliers for its last order (`last_pad_scale`)."""

    def __init__(self, trainer: "Trainer"):
        self.t = trainer
        self.reweighted = False

    def lr(self, epoch: int) -> float:
        c = self.t.cfg
        return lr_at(epoch, c.lr, c.warmup_epochs, c.milestones, c.milestone_factors)

    def batches(self, epoch: int):
        t = self.t
        rebalance = t.policy(epoch)
        order = sample_order(rebalance.sampler, t.data.y_train_cpu, epoch, t.cfg.epochs, t.sample_gen).to(t.device)
        self.weight = None if rebalance.class_weight is None else rebalance.class_weight.to(t.device)
        self.reweighted = self.weight is not None
        scale = getattr(rebalance.sampler, "last_pad_scale", None)
        return t._batches(order, None if scale is None else scale.to(t.device), epoch)

    def loss(self, batch) -> StepResult:
        t = self.t
        x, y = batch
        if t.world > 1:  # this rank's slice of the global batch
            x, y = x[t.rank::t.world], y[t.rank::t.world]
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with t.autocast():
            logits, feats = t._logits(x)
        logits = logits.float()
        loss = t.loss(logits, y, self.weight, None if feats is None else feats.float())
        return StepResult(loss, logits, (logits.detach().argmax(1) == y).sum(), len(y))


def best_model(model, state: dict):
    """A copy of `model` holding the best-epoch weights recorded in a checkpoint, or None when none were
    kept or they equal the final weights tensor for tensor (the best epoch was the last: `model` serves)."""
    best, final = state["best"]["model"], state["model"]
    if best is None or (best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in final)):
        return None
    m = copy.deepcopy(model)
    m.load_state_dict(state["best"]["model"])
    return m
