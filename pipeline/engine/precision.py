"""train.precision: which arithmetic the model runs in (the loss is always float32).

- ``fp32``: plain float32.
- ``bf16``: bfloat16 autocast for the model's convolutions and matmuls; the classifier head, the
  loss and the optimizer stay float32 (heads compute their logits outside autocast, see
  `pipeline.models.heads`).
- ``auto``: bf16 on CUDA, and on a CPU only where the processor has native bf16 arithmetic
  (AVX-512 BF16 or AMX) and torch's kernels may use it; fp32 everywhere else, because emulated bf16
  is slower than fp32. `ONEDNN_MAX_CPU_ISA=AVX2` (with `ATEN_CPU_CAPABILITY=avx2`: the kernels of
  an AVX2 CPU, for fp32 results that repeat bit for bit across CPUs: README "Reproducing a result
  bit for bit") keeps them from it.

The memory layout is channels_last in every mode: it measured faster than NCHW on CUDA and on both
CPUs we measured (fp32 ResNet-32 training steps: +19% on an AVX-512 EPYC, +10-20% on an AVX2 EPYC;
`longtail bench` prints every mode on the machine at hand)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The processor's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if platform.system() != "Linux" or not path.exists():
            return set()
        cpuinfo = path.read_text(errors="replace")
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    return any(f in cpu_flags(cpuinfo) for f in NATIVE_BF16_FLAGS)


def _onednn_limit(env) -> tuple[str, str] | None:
    """oneDNN's ISA limit as (variable, value): the first of ONEDNN_MAX_CPU_ISA and DNNL_MAX_CPU_ISA
    that is set (oneDNN's own order), or None."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        isa = env.get(name, "").strip().upper()
        if isa:
            return name, isa
    return None


def kernels_restricted(env=None) -> str | None:
    """The setting that keeps torch's bf16 kernels from native bf16 (as `NAME=value`), or None.
    Convolutions and matrix products in bf16 run in oneDNN, so oneDNN's ISA limit decides, when it
    names an ISA without bf16 (AVX2, AVX512_CORE, ...)."""
    limit = _onednn_limit(os.environ if env is None else env)
    if limit is None:
        return None
    name, isa = limit
    native = isa in ("ALL", "DEFAULT") or any(k in isa for k in ("BF16", "FP16", "AMX", "AVX10"))
    return None if native else f"{name}={isa}"


def cpu_kernels(env=None) -> str:
    """Which CPU kernels torch runs, e.g. 'ATen AVX512, oneDNN all' or 'ATen AVX2, oneDNN AVX2': with
    the precision, what decides the float rounding of a CPU run (MLflow `resolved.cpu_kernels`)."""
    import torch

    limit = _onednn_limit(os.environ if env is None else env)
    return f"ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN {limit[1] if limit else 'all'}"


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16: what runs
    channels_last: bool
    reason: str  # one line: why this mode (printed at stage start)


def resolve(setting: str, device_type: str, cpuinfo: str | None = None, env=None) -> Precision:
    """The precision mode for train.precision = `setting` on a device of `device_type` (`cpuinfo` and
    `env`: /proc/cpuinfo's text and the environment, for tests)."""
    if setting not in PRECISIONS:
        raise ValueError(setting)
    if device_type == "cuda":
        name = "fp32" if setting == "fp32" else "bf16"
        return Precision(name, True, f"{name} on CUDA" + (" (auto)" if setting == "auto" else ""))
    flag, restricted = cpu_has_native_bf16(cpuinfo), kernels_restricted(env)
    native = flag and restricted is None
    if setting == "auto":
        name = "bf16" if native else "fp32"
        why = ("the CPU has native bf16 (avx512_bf16/amx_bf16)" if native
               else f"the CPU has native bf16 but {restricted} keeps torch's kernels from it" if flag
               else "the CPU has no native bf16 (no avx512_bf16/amx_bf16 flag)")
        return Precision(name, True, f"{name} (auto: {why}" + ("" if native else ", so bf16 would be emulated and slow")
                         + ")")
    if setting == "bf16" and not native:
        return Precision("bf16", True, "bf16 as set, although " + (f"{restricted} keeps torch's kernels from native "
                                                                   "bf16" if flag else "this CPU has no native bf16")
                         + ": expect it to be slower than fp32")
    return Precision(setting, True, f"{setting} as set")
