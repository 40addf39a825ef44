"""`longtail sweep --executor slurm`: the options and the refusals that need no cluster (the
end-to-end test with a real SLURM is tests/e2e/test_slurm.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from testkit import ROOT, clean_env, project_params

from pipeline import slurm
from pipeline.errors import LongtailError


def test_params_yaml_slurm_section_gives_the_defaults():
    section = project_params()["slurm"]
    o = slurm.options(section, {})
    assert (o.partition, o.time, o.gpus, o.cpus, o.mem, o.parallel, o.options) == (None, 240, 0, 2, None, 0, {})


def test_flags_override_params_and_map_to_submitit():
    o = slurm.options({"partition": "gpu", "time": "2-00:00:00", "gpus": 1, "options": {"account": "lab"}},
                      {"partition": "a100", "time": None, "cpus": 8, "mem": "32G", "parallel": 4},
                      ["qos=high", "--constraint=a100"])
    kw = o.submitit("s", 20)
    assert kw["partition"] == "a100" and kw["time"] == 2880 and kw["gpus_per_node"] == 1
    assert kw["cpus_per_task"] == 8 and kw["mem"] == "32G" and kw["array_parallelism"] == 4
    assert kw["additional_parameters"] == {"account": "lab", "qos": "high", "constraint": "a100"}
    assert slurm.options(None, {}).submitit("s", 7)["array_parallelism"] == 7  # 0 = no limit


@pytest.mark.parametrize("text,minutes", [(90, 90), ("90", 90), ("1:30:00", 90), ("0:00:30", 1), ("1-01:00:00", 1500)])
def test_time(text, minutes):
    assert slurm.parse_time(text) == minutes


@pytest.mark.parametrize("section,flags,extra,msg", [
    ({"partiton": "x"}, {}, [], "slurm.partiton: unknown key (valid: partition, time"),
    ({}, {"time": "soon"}, [], "slurm time must be minutes"),
    ({}, {"time": "0"}, [], "at least 1 minute"),
    ({}, {"gpus": -1}, [], "slurm gpus must be a whole number >= 0"),
    ({}, {"cpus": 0}, [], "slurm cpus must be a whole number >= 1"),
    ({}, {"mem": "lots"}, [], "slurm mem must be like 16G"),
    ({}, {}, ["account"], "--sbatch takes KEY=VALUE"),
    ({}, {}, ["array=0-9"], "--array is set by longtail itself"),
    ({"options": {"output": "x"}}, {}, [], "--output is set by longtail itself"),
])
def test_bad_options_fail_with_one_line(section, flags, extra, msg):
    with pytest.raises(LongtailError, match=None) as exc:
        slurm.options(section, flags, extra)
    assert msg in str(exc.value) and "\n" not in str(exc.value)


def _longtail(args, cwd, path=None):
    env = clean_env() if path is None else clean_env(PATH=path)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # a loaded 2-core machine took over 120 s


def test_cli_names_the_valid_executors_and_refuses_a_missing_sbatch(tmp_path):
    out = _longtail(["sweep", "--executor", "slrum"], ROOT)
    assert out.returncode == 2 and out.stderr.strip() == "error: unknown executor 'slrum' (valid: local, slurm)"
    out = _longtail(["sweep", "--time", "10"], ROOT)
    assert out.returncode == 2 and "are for --executor slurm" in out.stderr
    for f in ("params.yaml", "dvc.yaml"):
        (tmp_path / f).write_text((ROOT / f).read_text())
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    bare = str(Path(sys.executable).parent) + os.pathsep + "/usr/bin/nonexistent"  # python, no sbatch, no git
    out = _longtail(["sweep", "--executor", "slurm", "--seeds", "2"], tmp_path, path=bare)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "sbatch not found" in out.stderr and "valid: local, slurm" in out.stderr, out.stderr


def test_cli_status_without_sweeps_and_with_an_unknown_name(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    out = _longtail(["sweep", "--status"], tmp_path)
    assert out.returncode == 0 and "no SLURM sweeps under" in out.stdout, out.stderr
    out = _longtail(["sweep", "--status", "--name", "nope"], tmp_path)
    assert out.returncode == 2 and "no SLURM sweep named 'nope' (known: none)" in out.stderr


def test_the_sweep_record_is_written_by_the_one_atomic_writer_and_reads_back(tmp_path, monkeypatch):
    from pipeline import io

    used = []
    real = io.atomic_path
    monkeypatch.setattr(io, "atomic_path", lambda path: used.append(Path(path).name) or real(path))
    sweep = slurm.Sweep("s1", str(tmp_path), "abc123", [{"name": "e0", "label": "ERM", "args": ["-S", "seed=0"],
                                                         "jobs": ["17"]}], created=1.5)
    sweep.save()
    assert used == ["sweep.json"] and sorted(p.name for p in sweep.dir.iterdir()) == ["sweep.json"]
    assert slurm.Sweep.load(sweep.dir / "sweep.json") == sweep
