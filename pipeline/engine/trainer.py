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
from . import distributed
from .precision import resolve as resolve_precision
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
                                         weight_decay=cfg.weight_decay)
        self.sample_gen = torch.Generator().manual_seed(seed)  # epoch orders (CPU)
        self.aug_gen = torch.Generator(device=device).manual_seed(seed + 1)  # crops and flips
        self.epoch = 0  # next epoch to run
        self.history: list[dict] = []
        self.best = {"epoch": -1, "test_acc": -1.0, "model": None}
        self.needs_norms = bool(getattr(criterion, "needs_norms", False))
        self.precision = resolve_precision(cfg.precision, device.type)
        self.channels_last = self.precision.channels_last
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.seed = seed
        self.rank, self.world = distributed.world()
        self.net = model  # what the training step calls: the model, DDP-wrapped under torchrun
        if self.world > 1:
            if self.needs_norms:
                raise LongtailError("a loss with needs_norms (lsoftmax) cannot run under torchrun yet; run it "
                                    "in one process")
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

    # -- one epoch -------------------------------------------------------------------------------
    def _logits(self, x):
        if self.needs_norms:
            feats = self.model.features(x)
            return self.model.classifier(feats), feats
        return self.forward(x), None

    def _batches(self, order: torch.Tensor, repeats, epoch: int):
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
            idx = order[start:start + cfg.batch_size]
            x = augment(d.x_train[idx], self.pad, self.flip, self.aug_gen)
            if repeats is not None:  # copies: doubled crop padding
                strong = augment(d.x_train[idx], 2 * self.pad, self.flip, self.aug_gen)
                x = torch.where(repeats[start:start + cfg.batch_size, None, None, None], strong, x)
            yield normalize(x, d.mean, d.std), d.y_train[idx]

    def _loss(self, logits, feats, y, weight):
        if self.needs_norms:
            norms = (self.model.classifier.weight.norm(dim=1), feats.norm(dim=1))
            return self.criterion(logits, y, class_weight=weight, norms=norms)
        return self.criterion(logits, y, class_weight=weight)

    def train_epoch(self, epoch: int, on_batch: Callable | None = None) -> dict:
        cfg, d = self.cfg, self.data
        lr = lr_at(epoch, cfg.lr, cfg.warmup_epochs, cfg.milestones, cfg.milestone_factors)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if hasattr(self.criterion, "set_epoch"):
            self.criterion.set_epoch(epoch, cfg.epochs)
        rebalance = self.policy(epoch)
        order = rebalance.sampler.indices(d.y_train_cpu, epoch, cfg.epochs, self.sample_gen).to(self.device)
        weight = None if rebalance.class_weight is None else rebalance.class_weight.to(self.device)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        start, n = time.perf_counter(), len(order)
        steps = (n + cfg.batch_size - 1) // cfg.batch_size
        # a sampler that repeats minority images may ask for stronger augmentation of the copies
        repeats = rebalance.sampler.last_repeat_mask if getattr(rebalance.sampler, "strong_augment", False) else None
        if repeats is not None:
            repeats = repeats.to(self.device)
        for step, (x, y) in enumerate(self._batches(order, repeats, epoch)):
            if self.world > 1:  # this rank's slice of the global batch
                x, y = x[self.rank::self.world], y[self.rank::self.world]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                logits, feats = self._logits(x)
            logits = logits.float()
            loss = self._loss(logits, None if feats is None else feats.float(), y, weight)
            self.check_finite(loss, logits, epoch, step)
            self.step(loss)
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            if on_batch is not None:
                on_batch(step + 1, steps)
        if self.world > 1:
            distributed.all_reduce_sum(loss_sum)
            distributed.all_reduce_sum(correct)
        seconds = time.perf_counter() - start
        return {"epoch": epoch, "lr": lr, "train_loss": loss_sum.item() / n, "train_acc": correct.item() / n,
                "images_per_s": n / max(seconds, 1e-9), "epoch_seconds": seconds,
                "reweighted": weight is not None}

    @torch.no_grad()
    def predict(self, x_uint8: torch.Tensor, model=None) -> torch.Tensor:
        model = model or self.model
        model.eval()
        out = []
        for i in range(0, len(x_uint8), self.cfg.eval_batch_size):
            x = normalize(x_uint8[i:i + self.cfg.eval_batch_size], self.data.mean, self.data.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                out.append(model(x).argmax(1))
        return torch.cat(out)

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, until: int, on_epoch: Callable[[dict], None] | None = None,
            save: Callable[[dict], None] | None = None, checkpoint_every: int = 1,
            on_batch: Callable | None = None,
            train_epoch: Callable[[int, Callable | None], dict] | None = None) -> None:
        """Run epochs [self.epoch, until); evaluate every `eval_every` epochs and at the last one.
        `train_epoch(epoch, on_batch) -> row` (same keys as `Trainer.train_epoch`) replaces the built-in
        epoch, so a fine-tune strategy with its own step keeps evaluation, history, best and checkpoints."""
        step_epoch = train_epoch or self.train_epoch
        while self.epoch < until:
            e = self.epoch
            row = step_epoch(e, on_batch)
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


def best_model(model, state: dict):
    """A copy of `model` holding the best-epoch weights recorded in a checkpoint (or None)."""
    if state["best"]["model"] is None:
        return None
    m = copy.deepcopy(model)
    m.load_state_dict(state["best"]["model"])
    return m
