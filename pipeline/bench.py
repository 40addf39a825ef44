"""`longtail bench`: throughput of the training path on CIFAR-10-LT r=100 shapes (12,406 train
and 10,000 test images of 32x32x3, ResNet-32, batch 128), for the device-resident fast path and
the reference-style path of the LDAM-DRW scripts (PIL + torchvision transforms + DataLoader),
measured in the same process. Prints figures; it is not a test."""

from __future__ import annotations

import resource
import time
from dataclasses import replace

import numpy as np
import torch

from .build import pick_device
from .data.profiles import lt_counts
from .data.sources import CIFAR_MEAN, CIFAR_STD
from .engine.trainer import DeviceData, Rebalance, Trainer
from .methods.losses import build_ce
from .methods.samplers import build_instance
from .models.resnet import build_resnet32
from .params import Train

PROTOCOL = Train(epochs=200, batch_size=128, lr=0.1, momentum=0.9, weight_decay=2e-4, warmup_epochs=5,
                 milestones=(160, 180), milestone_factors=(0.01, 0.0001), eval_every=1, eval_batch_size=None,
                 reweighting="none", sampler="instance", pad=4, flip=True, device="auto", checkpoint_every=10,
                 compile=None, loader="device", loader_workers=2, precision="fp32")
MEAN, STD = CIFAR_MEAN, CIFAR_STD  # the protocol's normalisation (one home: data/sources.py)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _data(device, seed=0):
    counts = lt_counts(5000, 10, "exp", 100)
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(10), counts)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    xt = rng.integers(0, 256, (10000, 32, 32, 3), dtype=np.uint8)
    yt = np.repeat(np.arange(10), 1000)

    def images(a):
        t = torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
        return t.to(device, memory_format=torch.channels_last) if device.type == "cuda" else t.to(device)

    return counts, DeviceData(images(x), torch.from_numpy(y).to(device), images(xt), torch.from_numpy(yt).to(device),
                              torch.tensor(MEAN, device=device), torch.tensor(STD, device=device), host_images=x)


def _trainer(cfg, counts, data, device):
    torch.manual_seed(0)
    loss = build_ce(counts).to(device)
    model = build_resnet32(10, 3, "linear").to(device)
    policy = Rebalance(None, build_instance(counts))
    return Trainer(model, loss, data, cfg, lambda e: policy, device, 0, cfg.pad, cfg.flip)


def _train_ips(trainer, steps: int, warmup: int) -> float:
    """Images/s of training steps (sampling, augmentation, forward, backward, update)."""
    cfg = trainer.cfg
    n = (steps + warmup) * cfg.batch_size
    order = torch.randperm(len(trainer.data.y_train))[:n]
    if len(order) < n:
        order = order.repeat(n // len(order) + 1)[:n]
    trainer.model.train()
    t0 = None
    for i, (x, y) in enumerate(trainer._batches(order.to(trainer.device), None, 0)):
        if i == warmup:
            _sync(trainer.device)
            t0 = time.perf_counter()
        if trainer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with trainer.autocast():
            logits = trainer.forward(x)
        trainer.step(trainer.criterion(logits.float(), y))
    _sync(trainer.device)
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def _eval_ips_fast(trainer) -> float:
    trainer.predict(trainer.data.x_test[:2048])
    _sync(trainer.device)
    t0 = time.perf_counter()
    trainer.predict(trainer.data.x_test)
    _sync(trainer.device)
    return len(trainer.data.y_test) / (time.perf_counter() - t0)


@torch.no_grad()
def _eval_ips_reference(trainer, workers: int) -> float:
    """The reference scripts' evaluation: PIL + ToTensor + Normalize through a DataLoader, batch 100."""
    from torchvision import transforms as T

    from .engine.reference_loader import PilDataset

    x = trainer.data.x_test.permute(0, 2, 3, 1).cpu().numpy()
    ds = PilDataset(x, trainer.data.y_test.cpu().numpy(), T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)]))
    loader = torch.utils.data.DataLoader(ds, batch_size=100, num_workers=workers)
    trainer.model.eval()
    t0 = time.perf_counter()
    for xb, _ in loader:
        trainer.model(xb.to(trainer.device)).argmax(1)
    _sync(trainer.device)
    return len(ds) / (time.perf_counter() - t0)


MODES = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))  # (precision, channels_last)


def _measure(cfg, counts, data, device, steps, warmup, workers, precision, channels_last):
    cfg = replace(cfg, precision=precision)
    trainer = _trainer(cfg, counts, data, device)
    trainer.channels_last = channels_last
    trainer.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reference = cfg.loader == "reference"
    train_ips = _train_ips(trainer, steps, 1 if reference else warmup)
    eval_ips = _eval_ips_reference(trainer, workers) if reference else _eval_ips_fast(trainer)
    epoch_s = len(data.y_train) / train_ips + len(data.y_test) / eval_ips
    return {"train_images_per_s": train_ips, "eval_images_per_s": eval_ips, "epoch_seconds": epoch_s,
            "projected_200_epochs_s": 200 * epoch_s, "projected_30_epochs_s": 30 * epoch_s,
            "cuda_max_allocated_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                                       if device.type == "cuda" else None)}


def run(device_name: str = "auto", steps: int = 20, warmup: int = 3, workers: int = 2,
        compile_: bool | None = None, echo=print) -> dict:
    """One row per pipeline and precision mode: the reference-style fp32 pipeline (PIL + DataLoader,
    NCHW, as the authors' scripts) and the fast path in fp32 / bf16, NCHW / channels_last."""
    from .engine.precision import resolve

    device = pick_device(device_name)
    counts, data = _data(device)
    n_train, n_test = sum(counts), len(data.y_test)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    auto = resolve("auto", device.type)
    echo(f"device: {name}; torch {torch.__version__}; CIFAR-10-LT r=100 shapes: {n_train} train / {n_test} test, "
         f"ResNet-32, batch {PROTOCOL.batch_size}, {steps} timed steps")
    echo(f"train.precision=auto here: {auto.reason}, {'channels_last' if auto.channels_last else 'NCHW'}")
    rows = {"reference fp32 NCHW": _measure(replace(PROTOCOL, loader="reference", loader_workers=workers, compile=False),
                                            counts, data, device, steps, warmup, workers, "fp32", False)}
    for precision, cl in MODES:
        label = f"fast {precision} {'channels_last' if cl else 'NCHW'}"
        if (precision, cl) == (auto.name, auto.channels_last):
            label += " (auto)"
        rows[label] = _measure(replace(PROTOCOL, compile=compile_), counts, data, device, steps, warmup, workers,
                               precision, cl)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base = rows["reference fp32 NCHW"]["epoch_seconds"]
    echo(f"{'pipeline':<34}{'train img/s':>12}{'eval img/s':>11}{'s/epoch':>9}{'x ref':>7}{'200 ep':>9}{'30 ep':>8}")
    for label, r in rows.items():
        echo(f"{label:<34}{r['train_images_per_s']:>12.0f}{r['eval_images_per_s']:>11.0f}{r['epoch_seconds']:>9.1f}"
             f"{base / r['epoch_seconds']:>6.2f}x{r['projected_200_epochs_s'] / 60:>7.1f} m"
             f"{r['projected_30_epochs_s'] / 60:>6.1f} m")
    mem = f"peak RSS {rss:.0f} MiB"
    if device.type == "cuda":
        mem += "; CUDA max allocated " + ", ".join(f"{p} {r['cuda_max_allocated_mib']:.0f} MiB" for p, r in rows.items())
    echo(mem)
    auto_label = next(k for k in rows if k.endswith("(auto)"))
    return {"device": name, "speedup": base / rows[auto_label]["epoch_seconds"], "peak_rss_mib": rss,
            "auto": auto_label, "rows": rows}
