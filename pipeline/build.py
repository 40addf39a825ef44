"""The one place that turns params into objects through the registry (model, loss, re-balancing
policy, device data). Stages call this; the trainer only ever sees the objects."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import registry
from .data.store import Prepared
from .engine.trainer import DeviceData, Rebalance
from .errors import LongtailError
from .params import Params


def gpu_present() -> str:
    """A GPU the machine has, whether or not torch can use it ("" when none is seen)."""
    import glob
    import os

    if glob.glob("/dev/nvidia[0-9]*"):
        return "/dev/nvidia0"
    if os.path.exists("/dev/kfd"):
        return "/dev/kfd (AMD)"
    return ""


def describe_device(device: torch.device) -> str:
    """What a stage prints at its start: the device, with the GPU's name; a warning when the machine
    has a GPU that torch cannot use (e.g. a driver older than the wheel's CUDA)."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"device cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    line = f"device {device}"
    seen = gpu_present() if device.type == "cpu" else ""
    if seen and not torch.cuda.is_available():
        line += (f"\nwarning: a GPU is present ({seen}) but torch {torch.__version__} cannot use it "
                 f"(built for CUDA {torch.version.cuda or 'none'}; is the driver too old, or the GPU not passed "
                 "into the container with --gpus all?): training runs on the CPU")
    return line


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LongtailError("train.device is 'cuda' but no CUDA device is available (valid here: auto, cpu)")
    return torch.device(name)


def build_loss(p: Params, class_counts: list[int]):
    return registry.build("losses", p.loss, class_counts, params=p.loss_params, param_key=f"losses.{p.loss}")


def build_model(p: Params, num_classes: int, in_channels: int, head: str):
    return registry.build("models", p.model_arch, num_classes, in_channels, head,
                          params=p.model_params, param_key="model")


def class_weights(name: str, p: Params, class_counts: list[int]) -> torch.Tensor | None:
    w = registry.build("reweighting", name, class_counts, params=p.reweighting_params[name],
                       param_key=f"reweightings.{name}")  # one weight per class: registry.check_built
    w = torch.tensor(w, dtype=torch.float32)
    return None if torch.all(w == 1) else w  # all-ones is the plain (unweighted) mean


def build_policy(p: Params, class_counts: list[int]):
    """Epoch -> Rebalance: the train.* choice before finetune.start_epoch, the finetune.* one after."""
    phases = {}
    for phase, choice in (("train", p.train), ("finetune", p.finetune)):
        sampler = registry.build("samplers", choice.sampler, class_counts, params=p.sampler_params[choice.sampler],
                                 param_key=f"samplers.{choice.sampler}")
        phases[phase] = Rebalance(class_weights(choice.reweighting, p, class_counts), sampler)
    start = p.finetune.start_epoch
    return lambda epoch: phases["finetune"] if epoch >= start else phases["train"]


def device_data(ds: Prepared, device: torch.device) -> DeviceData:
    def images(x):  # NHWC uint8 numpy -> NCHW uint8 on the device
        t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        return t.to(device, memory_format=torch.channels_last) if device.type == "cuda" else t.to(device)

    return DeviceData(
        x_train=images(ds.x_train), y_train=torch.from_numpy(ds.y_train).long().to(device),
        x_test=images(ds.x_test), y_test=torch.from_numpy(ds.y_test).long().to(device),
        mean=torch.tensor(ds.mean, dtype=torch.float32, device=device),
        std=torch.tensor(ds.std, dtype=torch.float32, device=device),
        host_images=ds.x_train,
    )


@dataclass
class Augment:
    pad: int
    flip: bool


def augmentation(p: Params, ds: Prepared) -> Augment:
    side = ds.x_train.shape[1]
    pad = p.train.pad if p.train.pad is not None else max(1, side // 8)  # 4 px for 32 px, as in the protocol
    flip = p.train.flip if p.train.flip is not None else bool(ds.hflip)
    return Augment(pad, flip)
