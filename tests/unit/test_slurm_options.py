"""`longtail sweep --executor slurm`: the options and the refusals that need no cluster (the
end-to-end test with a real SLURM is tests/e2e/test_slurm.py)."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

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
    ({}, {"time": "soon"}, [], "--time must be minutes"),
    ({}, {"time": "0"}, [], "at least 1 minute"),
    ({}, {"gpus": -1}, [], "--gpus must be a whole number >= 0"),
    ({}, {"cpus": 0}, [], "--cpus must be a whole number >= 1"),
    ({}, {"mem": "lots"}, [], "--mem must be like 16G"),
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


SECTION = project_params()["slurm"]


@pytest.mark.parametrize("section, message", [
    (5, "slurm must be a mapping of SLURM job settings (partition, time, gpus, cpus, mem, parallel, options), got 5"),
    ({**SECTION, "time": "abc"}, "slurm.time must be minutes (e.g. 240) or [D-]HH:MM:SS, got 'abc'"),
    ({**SECTION, "time": 0}, "slurm.time must be at least 1 minute, got 0"),
    ({**SECTION, "gpus": "one"}, "slurm.gpus must be a whole number >= 0, got 'one'"),
    ({**SECTION, "cpus": 0}, "slurm.cpus must be a whole number >= 1, got 0"),
    ({**SECTION, "parallel": 1.5}, "slurm.parallel must be a whole number >= 0, got 1.5"),
    ({**SECTION, "partition": 7},
     "slurm.partition must be a partition name (or null for the cluster's default), got 7"),
    ({**SECTION, "mem": "lots"},
     "slurm.mem must be like 16G or 4000M (or null for the partition's default), got 'lots'"),
    ({**SECTION, "options": [1]},
     "slurm.options must be a mapping of sbatch options (e.g. {account: mylab, qos: normal}), got [1]"),
    ({**SECTION, "options": {"account": ["a"]}},
     "slurm.options.account must be an sbatch option's value (a string, a number, or true for a flag), got ['a']"),
    ({**SECTION, "options": {1: "x"}},
     "slurm.options.1: an sbatch option is named by a word without dashes (e.g. account), got 1"),
    ({**SECTION, "options": {"output": "x"}},
     "slurm.options.output: sbatch option --output is set by longtail itself; leave it out"),
])
def test_each_bad_value_of_the_slurm_section_is_one_line_in_check_and_sweep(tmp_path, section, message):
    """`slurm: 5` gave "TypeError: 'int' object is not iterable" in `sweep --executor slurm`, `slurm.options:
    [1]` "cannot convert dictionary update sequence", and `longtail check` accepted both (and `slurm.time:
    abc`). Each value is now checked, naming slurm.<key> and what is valid, by check and by the sweep."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    for call in (lambda: slurm.check_section(section), lambda: slurm.options(section, {})):
        with pytest.raises(LongtailError) as err:
            call()
        assert str(err.value) == message
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**project_params(), "slurm": section}))
    result = CliRunner().invoke(app, ["check", "--params", str(params)])
    assert isinstance(result.exception, LongtailError) and str(result.exception) == message, result.output


def test_the_slurm_sections_defaults_and_flags_are_named_as_given():
    assert slurm.check_section(None) == {} and slurm.options({"options": None, "mem": None}, {}).options == {}
    assert slurm.options({**SECTION, "options": {"account": "lab", "exclusive": True, "nodes": 1}}, {}).options == \
        {"account": "lab", "exclusive": True, "nodes": 1}
    with pytest.raises(LongtailError) as err:
        slurm.options({**SECTION, "time": "abc"}, {"time": "90"})  # the section is checked even where a flag wins
    assert str(err.value) == "slurm.time must be minutes (e.g. 240) or [D-]HH:MM:SS, got 'abc'"
    with pytest.raises(LongtailError) as err:
        slurm.options(SECTION, {"time": "abc"})
    assert str(err.value) == "--time must be minutes (e.g. 240) or [D-]HH:MM:SS, got 'abc'"
    with pytest.raises(LongtailError) as err:
        slurm.options(SECTION, {}, ["job-name=x"])
    assert str(err.value) == "--sbatch job-name: sbatch option --job-name is set by longtail itself; leave it out"


# what submitit writes to a job's log (stderr_to_stdout) when the job raised: its ERROR line (from its stdout
# and its stderr handler), then Python's traceback
RAISED_LOG = """submitit INFO (2026-01-01 10:00:00,000) - Starting with JobEnvironment(job_id=17, hostname=n1)
submitit INFO (2026-01-01 10:00:00,001) - Loading pickle: /p/.longtail/slurm/s1/jobs/17/17_submitted.pkl
$ python -m dvc exp run -n s1-0 -S seed=0
epoch 3/6  loss 1.93
ERROR: failed to reproduce 'pretrain': failed to run: longtail pretrain, exited with 2
submitit ERROR (2026-01-01 10:05:00,000) - Submitted job triggered an exception
submitit ERROR (2026-01-01 10:05:00,000) - Submitted job triggered an exception
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/submitit/core/submission.py", line 69, in process_job
    raise error
  File "/p/pipeline/slurm.py", line 520, in __call__
    raise LongtailError(f"{self.name}: `dvc exp run` failed with exit code {rc} (its output is above)")
pipeline.errors.LongtailError: s1-0: `dvc exp run` failed with exit code 2 (its output is above)
"""


class _Payload:
    """A result pickle that creates a file when it is unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_failed_jobs_reason_is_read_from_its_log_and_its_result_pickle_is_never_loaded(tmp_path):
    """`sweep --status` read a failed job's reason with pickle.load of submitit's result file, which runs
    whatever code the file names. The reason now comes from the job's log: the exception it ended with
    (the same line the result held), else a kill."""
    import pickle

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    sweep = slurm.Sweep("s1", str(tmp_path), "0" * 40, [
        {"name": f"s1-{i}", "label": f"seed={i}", "args": ["-S", f"seed={i}"], "jobs": [str(17 + i)]}
        for i in range(4)])
    marker = tmp_path / "unpickled"
    for i, log in enumerate((RAISED_LOG, RAISED_LOG.split("submitit ERROR")[0],
                             "submitit INFO (2026-01-01 10:00:00,000) - Job completed successfully\n")):
        paths = slurm._job_paths(sweep, str(17 + i))
        paths.folder.mkdir(parents=True)
        paths.stdout.write_text(log)
        paths.result_pickle.write_bytes(pickle.dumps(("error", _Payload(marker))))
    # a job logged with stderr apart from stdout (a record of an older longtail): the traceback is in stderr
    paths = slurm._job_paths(sweep, "20")
    paths.folder.mkdir(parents=True)
    paths.stdout.write_text(RAISED_LOG.split("submitit ERROR")[0] + "submitit ERROR (x) - Submitted job triggered "
                            "an exception\n")
    paths.stderr.write_text("submitit ERROR" + RAISED_LOG.split("submitit ERROR", 2)[2].replace("s1-0", "s1-3"))

    rows = slurm.experiment_states(sweep, queue={}, log_lines=2)
    assert [(r.state, r.why) for r in rows] == [
        ("failed", "pipeline.errors.LongtailError: s1-0: `dvc exp run` failed with exit code 2 (its output is above)"),
        ("failed", "killed before it finished (scancel, time limit, preemption or node failure)"),
        ("failed", "ended without putting the experiment into the project"),
        ("failed", "pipeline.errors.LongtailError: s1-3: `dvc exp run` failed with exit code 2 (its output is above)")]
    assert rows[0].log == ["epoch 3/6  loss 1.93", "ERROR: failed to reproduce 'pretrain': failed to run: "
                                                   "longtail pretrain, exited with 2"]
    assert not marker.exists()
    lines = []
    slurm.print_status(sweep, rows, lines.append)
    assert lines[1:4] == ["  s1-0  failed   job 17         seed=0",
                          "      pipeline.errors.LongtailError: s1-0: `dvc exp run` failed with exit code 2 (its "
                          "output is above)",
                          "      | epoch 3/6  loss 1.93"]
    source = (ROOT / "pipeline" / "slurm.py").read_text()
    assert "import pickle" not in source and "pickle.load" not in source
