"""The golden run (tests/unit/test_golden.py): a small, complete pipeline run whose results are pinned.
Run as `python -m testkit.golden DIR` (with tests/ on the path) it prints the results as JSON.

Float rounding depends on which CPU kernels torch picks: fp32 on one thread gives other digits with
the AVX-512 kernels than with the AVX2 ones (the first epoch's training loss 2.54191 against
2.54315). KERNELS holds torch to the AVX2 kernels, so the pin made on an AVX2 AMD EPYC holds on an
AVX-512 one too (checked; an Intel CPU's MKL may pick its own path for fp32 matmuls, not checked):
set before torch is imported, hence a process of its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SETTINGS = {"dataset": "digits", "schedule": "short", "loss": "ce", "seed": 0, "finetune.reweighting": "cb",
            "train.device": "cpu", "train.precision": "fp32", "train.checkpoint_every": 100}
KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def run(out: Path) -> dict:
    """Build, pretrain, fine-tune and evaluate in `out`, on one thread; the figures the pin holds."""
    import torch

    from pipeline import io
    from pipeline.engine.precision import cpu_kernels
    from pipeline.params import override, parse
    from pipeline.stages import build_dataset, evaluate, training

    from .params import project_params

    torch.set_num_threads(1)  # float reductions in a fixed order, whatever the machine's core count
    p = parse(override(project_params(), SETTINGS))
    build_dataset.run(p, out_dir=out / "prepared")
    files = dict(dataset=out / "prepared" / "dataset.npz", pretrain=out / "pre.pt", final=out / "final.pt",
                 resume_dir=out / "resume")
    training.run("pretrain", p, **files)
    training.run("finetune", p, **files)
    result = evaluate.run(p, dataset=files["dataset"], final=files["final"], metrics=out / "eval.json",
                          plots=out / "plots")
    state = io.load_checkpoint(files["final"])
    return {
        "settings": SETTINGS,
        "epochs": state["epoch"],
        "final_top1": round(result["final"]["top1"], 6),
        "best_top1": round(result["best"]["top1"], 6),
        "best_epoch": result["best"]["epoch"],
        "many_medium_few": [None if result["final"][g] is None else round(result["final"][g], 6)
                            for g in ("many", "medium", "few")],
        "train_loss": [round(r["train_loss"], 5) for r in state["history"]],
        "cpu_kernels": cpu_kernels(),
    }


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]))))
