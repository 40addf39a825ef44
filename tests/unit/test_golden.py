"""The golden run (tests/testkit/golden.py): digits, exp r = 100, ERM-DRW, the short schedule, fp32 on
the CPU, one thread, with torch held to its AVX2 kernels. Its results are pinned in
tests/golden/digits_erm_drw_short.json. Any change of behaviour (data selection, augmentation, sampling
order, schedule, model, loss, evaluation) shows up here, so it has to be deliberate: re-pin with

    LONGTAIL_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_golden.py

and say why in the commit. A pure refactor must leave this file unchanged."""

import json
import os
import subprocess
import sys

import pytest

from testkit import ROOT, clean_env
from testkit.golden import KERNELS
from pipeline.engine.precision import cpu_flags

GOLDEN = ROOT / "tests" / "golden" / "digits_erm_drw_short.json"


@pytest.mark.skipif("avx2" not in cpu_flags(), reason="the golden run is pinned for torch's x86-64 AVX2 kernels; "
                                                      "this machine shows no AVX2 flag in /proc/cpuinfo (not Linux "
                                                      "on an AVX2 CPU)")
def test_the_golden_run_is_unchanged(tmp_path):
    out = subprocess.run([sys.executable, "-m", "testkit.golden", str(tmp_path)], cwd=ROOT / "tests",
                         env=clean_env(**KERNELS, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got.pop("cpu_kernels") == "ATen AVX2, oneDNN AVX2"  # ATen's own report; oneDNN's is the setting
    if os.environ.get("LONGTAIL_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    pinned = json.loads(GOLDEN.read_text())
    assert got == pinned
