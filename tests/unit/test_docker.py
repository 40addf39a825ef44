"""The image (checked as a layout: no Docker daemon needed): one documented `docker run` keeps the whole
workspace on the host, works for the paper run and the demo, as a non-root user, with a C compiler."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from testkit import ROOT

from pipeline import tracking


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _readme_docker_runs() -> list[list[str]]:
    runs = [line.split("#")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()
            if line.strip().startswith("docker run")]
    return [shlex.split(r) for r in runs]


def test_documented_docker_run_mounts_the_whole_workspace_at_the_images_workdir():
    ins = _instructions()
    workdir = [v for op, v in ins if op == "WORKDIR"][-1]
    runs = _readme_docker_runs()
    assert runs, "README documents no docker run"
    commands = set()
    for argv in runs:
        mounts = [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]
        assert mounts == [f"$PWD:{workdir}"], argv  # the whole workspace, not only data/
        assert "--user" in argv  # files on the host belong to the host user
        commands.add(" ".join(argv[argv.index("longtail") + 1:]) or "CMD")
    assert commands == {"CMD", "longtail demo"}  # the paper run (the image's CMD) and the demo
    assert [v for op, v in ins if op == "CMD"][-1] == '["dvc", "repro"]'


def test_image_runs_as_non_root_with_git_and_a_c_compiler():
    ins = _instructions()
    users = [v for op, v in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    apt = " ".join(v for op, v in ins if op == "RUN" and "apt-get install" in v)
    assert re.search(r"\bgit\b", apt) and re.search(r"\bgcc\b", apt)  # DVC experiments; torch.compile's Triton
    assert "no_scm" not in (ROOT / "Dockerfile").read_text()


def _image_env() -> dict:
    """The image's ENV instructions as a dict (KEY=VALUE pairs, as this Dockerfile writes them)."""
    return dict(kv.split("=", 1) for op, v in _instructions() if op == "ENV" for kv in shlex.split(v))


def test_any_host_uid_has_a_user_name_for_dvc_and_git():
    """`docker run --user "$(id -u):$(id -g)"` with a uid the image's /etc/passwd lacks (every host user
    but uid 1000): DVC names its site cache after getpass.getuser(), and a DVC experiment commits with a
    git identity; both fall back to the passwd entry, so `dvc repro` and `longtail demo` failed there."""
    code = ("import getpass, pwd\n"
            "def lacks(uid): raise KeyError(uid)\n"
            "pwd.getpwuid = lacks  # the uid has no passwd entry\n"
            "from dulwich.config import StackedConfig\n"
            "from dulwich.repo import get_user_identity\n"
            "print(getpass.getuser()); print(get_user_identity(StackedConfig([]), 'COMMITTER').decode())")
    env = {"PATH": os.environ["PATH"], **_image_env()}  # nothing of this machine's user
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    user, identity = out.stdout.split("\n")[:2]
    assert user and re.fullmatch(r"[^<>]+ <[^<>]+@[^<>]+>", identity), out.stdout


def test_dockerignore_keeps_the_context_to_what_the_image_copies():
    ignore = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    assert ignore[0] == "**"
    included = {l[1:].rstrip("/") for l in ignore if l.startswith("!")}
    copied = {src.rstrip("/") for op, v in _instructions() if op == "COPY" for src in v.split()[:-1]}
    assert copied == included
    for heavy in (".venv", ".git", "data", "mlflow.db", "mlartifacts", "models", "node_modules"):
        assert not any(inc == heavy or inc.startswith(heavy + "/") for inc in included)


def test_everything_the_pipeline_writes_is_inside_the_workspace(tmp_path, monkeypatch):
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get(kind, []):
                path = next(iter(item)) if isinstance(item, dict) else item
                assert not Path(path).is_absolute() and ".." not in Path(path).parts, path
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    for var in ("LONGTAIL_ROOT", "DVC_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
