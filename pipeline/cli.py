"""The `longtail` command line. Each pipeline stage is one subcommand that reads params.yaml.

Start-up stays fast: torch, mlflow and the stage modules are imported inside the commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import interrupts
from .demo import DURATION as DEMO_DURATION
from .errors import LongtailError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Long-tailed image classification: build dataset -> pretrain -> DRW fine-tune -> evaluate.")
plugins_app = typer.Typer(no_args_is_help=True, help="List, check and scaffold method plugins.")
app.add_typer(plugins_app, name="plugins")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="the params file")
NoTrack = typer.Option(False, "--no-track", help="do not log this stage to MLflow")


def _version(value: bool):
    if value:
        from importlib.metadata import version

        typer.echo(f"longtail {version('longtail')}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")):
    """Long-tailed image classification: build dataset -> pretrain -> DRW fine-tune -> evaluate."""


def _stage(name: str, params_path: Path, no_track: bool, fn, distributed_ok: bool = False):
    """Load and validate params, open the stage's MLflow run, run it. Under torchrun, training
    stages run on every rank and only rank 0 tracks and writes; other stages run on rank 0 only."""
    from contextlib import nullcontext

    from .engine import distributed
    from .io import workspace_lock
    from .params import check_plugins, load

    p = load(params_path)
    check_plugins(p)
    if not distributed.is_main() and not distributed_ok:
        return None
    with workspace_lock(name) if distributed.is_main() else nullcontext():
        if distributed_ok:
            distributed.init_from_env(p.train.device)
        try:
            if no_track or not distributed.is_main():
                return fn(p, None)
            from .tracking import stage_run

            with stage_run(name, p.raw, p.experiment) as log:
                return fn(p, log)
        finally:
            if distributed_ok:
                distributed.shutdown()


@app.command("build-dataset")
def build_dataset(params: Path = ParamsOpt, no_track: bool = NoTrack):
    """Stage 1: the long-tailed train split + balanced test split -> data/prepared/."""
    from .stages import build_dataset as stage

    _stage("build-dataset", params, no_track, lambda p, log: stage.run(p, log=log))


@app.command()
def pretrain(params: Path = ParamsOpt, no_track: bool = NoTrack):
    """Stage 2: train epochs [0, finetune.start_epoch) -> models/pretrain.pt."""
    from .stages import training

    _stage("pretrain", params, no_track, lambda p, log: training.run("pretrain", p, log=log), distributed_ok=True)


@app.command()
def finetune(params: Path = ParamsOpt, no_track: bool = NoTrack):
    """Stage 3: resume models/pretrain.pt with deferred re-balancing -> models/final.pt."""
    from .stages import training

    _stage("finetune", params, no_track, lambda p, log: training.run("finetune", p, log=log), distributed_ok=True)


@app.command()
def evaluate(params: Path = ParamsOpt, no_track: bool = NoTrack):
    """Stage 4: per-class evaluation (final and best epoch) -> metrics/eval.json, plots/."""
    from .stages import evaluate as stage

    _stage("evaluate", params, no_track, lambda p, log: stage.run(p, log=log))


@app.command("export-images")
def export_images(out: Path = typer.Argument(..., help="the folder to write (new or empty)"),
                  dataset: str = typer.Option("cifar10", "--dataset", help="cifar10, cifar100 or digits"),
                  root: str = typer.Option("data/raw", "--root",
                                           help="where the official archive is: its folder or the .tar.gz itself "
                                                "(downloaded by torchvision when missing and online)")):
    """Write a dataset as an image folder (train/<class>/*.png, test/<class>/*.png) for dataset=imagefolder."""
    from .data.export import export_images as run

    n = run(dataset, root, out)
    typer.echo(f"wrote {n['train']} train and {n['test']} test images of {n['classes']} classes under {out}/; "
               f"use it with: dvc exp run -S dataset=imagefolder -S data.root={out}")


@app.command()
def check(params: Path = ParamsOpt):
    """Validate params.yaml (keys, values, plugin names) without running anything."""
    from .data import profile_label
    from .params import check_plugins, load
    from .slurm import check_section

    p = load(params)
    check_plugins(p)
    check_section(p.raw.get("slurm"))  # the job settings of `sweep --executor slurm` (slurm.py checks them)
    t = p.train
    typer.echo(f"{params}: ok (dataset={p.dataset}, {profile_label(p.imbalance, p.ratio)}, loss={p.loss}, schedule={p.schedule}: "
               f"epochs={t.epochs}, warm-up {t.warmup_epochs}, lr milestones {list(t.milestones)}, "
               f"finetune from {p.finetune.start_epoch})")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             help=f"Run the whole pipeline as a DVC experiment on the embedded digits data ({DEMO_DURATION}).\n\n"
                  "It runs the committed params.yaml with dataset=digits (workspace edits are undone for the "
                  "demo), then prints the method it ran and a summary table. Extra arguments go to "
                  "`dvc exp run`, e.g. `longtail demo -S loss=ldam`.")
def demo(ctx: typer.Context,
         temp: bool = typer.Option(True, "--temp/--workspace",
                                   help="run in a temporary copy (default) or in this workspace")):
    from . import demo as dm

    rc = dm.run(list(ctx.args), temp, typer.echo)
    if rc:
        raise typer.Exit(rc)


@app.command()
def report(out: Path = typer.Option(Path("reports"), "--out", "-o", help="output folder"),
           published: bool = typer.Option(False, "--published",
                                          help="add the published figures (pipeline/published.yaml) and the difference"),
           published_as: List[str] = typer.Option([], "--published-as",
                                                  help="OURS=PUBLISHED: compare runs of dataset OURS with the published "
                                                       "figures of PUBLISHED, e.g. imagefolder=cifar10 for the CIFAR-10 "
                                                       "images as a folder"),
           compare: Optional[str] = typer.Option(None, "--compare",
                                                 help="per-class error figure of these rows, e.g. CB-RW,HMM-DRW"),
           runs: str = typer.Option("first", "--runs", help="per-run figures: first (lowest seed of each cell), all, none"),
           where: List[str] = typer.Option([], "--where", help="only runs with KEY=VALUE, or without: KEY!=VALUE (a param, a tag or 'method')"),
           ignore: List[str] = typer.Option([], "--ignore", help="a param (or prefix) that may differ within a row"),
           experiment: Optional[str] = typer.Option(None, "--experiment",
                                                    help="MLflow experiment (default: tracking.experiment of params.yaml)"),
           list_methods: bool = typer.Option(False, "--list-methods", help="print the named-method table and exit")):
    """Tables (Markdown + CSV) and figures from the finished runs in the MLflow store -> reports/."""
    if list_methods:
        from .method_names import MethodNames

        typer.echo(MethodNames.load().markdown())
        return
    from . import report as rep
    from .tracking import fetch_artifact, finished_runs, tracking_uri

    if experiment is None:
        from .checks import yaml_file
        from .params import experiment_name

        params_file = Path("params.yaml")
        experiment = experiment_name(yaml_file(params_file, f"params file {params_file}")
                                     if params_file.exists() else {})
    aliases = rep.parse_published_as(published_as)
    rep.check_out(out)
    found = finished_runs("evaluate", experiment)
    res = rep.generate(found, out, fetch=fetch_artifact, published=published or bool(aliases), published_as=aliases,
                       compare=[c.strip() for c in compare.split(",") if c.strip()] if compare else None,
                       per_run=runs, where=rep.parse_where(where), ignore=ignore,
                       source=f"{tracking_uri()} (experiment {experiment!r})",
                       command=report_command(out=out, published=published, published_as=published_as, compare=compare,
                                              runs=runs, where=where, ignore=ignore, experiment=experiment))
    t = res["table"]
    typer.echo("\n".join(rep.error_table(t, "best")))
    typer.echo(f"\n{len(t.runs)} runs, {len(t.rows)} rows x {len(t.columns)} settings; wrote "
               f"{out / 'table.md'}, {out / 'table.csv'} and {len(res['written']) - 2} more file(s) under {out}/")


def report_command(*, out, published, published_as, compare, runs, where, ignore, experiment) -> str:
    """The `longtail report` command line of these options, as table.md states it (defaults left out, the
    experiment always named): running it against the same store writes the same tables."""
    import shlex

    args = ["longtail", "report"] + (["--published"] if published else [])
    for flag, values in (("--published-as", published_as), ("--where", where), ("--ignore", ignore)):
        for v in values:
            args += [flag, v]
    args += (["--compare", compare] if compare else []) + (["--runs", runs] if runs != "first" else [])
    return shlex.join(args + ["--experiment", experiment, "--out", str(out)])


@app.command()
def sweep(loss: Optional[str] = typer.Option(None, "--loss", help="losses, comma-separated (e.g. ce,ldam,mm)"),
          method: Optional[str] = typer.Option(None, "--method",
                                               help="named methods, comma-separated (e.g. ERM-DRW,LDAM-DRW,HMM-DRW)"),
          dataset: Optional[str] = typer.Option(None, "--dataset", help="datasets, comma-separated"),
          imbalance: Optional[str] = typer.Option(None, "--imbalance", help="profiles, comma-separated (exp,step)"),
          ratio: Optional[str] = typer.Option(None, "--ratio", help="imbalance ratios, comma-separated (e.g. 100,10)"),
          seeds: int = typer.Option(1, "--seeds", help="number of seeds per combination (seed=0..n-1)"),
          set_param: List[str] = typer.Option([], "-S", "--set-param", help="KEY=VALUE for every experiment"),
          name: Optional[str] = typer.Option(None, "--name", help="name the experiments NAME-0, NAME-1, ..."),
          run: bool = typer.Option(False, "--run", help="also start the queue and wait for it"),
          jobs: int = typer.Option(1, "-j", "--jobs", help="queue workers with --run"),
          dry_run: bool = typer.Option(False, "--dry-run", help="print the dvc commands, queue nothing"),
          executor: str = typer.Option("local", "--executor",
                                       help="local: DVC queue workers here; slurm: one SLURM job per experiment"),
          status: bool = typer.Option(False, "--status",
                                      help="show the SLURM sweeps (--name: one): queued/running/done/failed per "
                                           "experiment, job ids, a failed job's log tail"),
          partition: Optional[str] = typer.Option(None, "--partition", help="slurm: partition (default: slurm.partition)"),
          time_limit: Optional[str] = typer.Option(None, "--time", help="slurm: minutes or [D-]HH:MM:SS per job"),
          gpus: Optional[int] = typer.Option(None, "--gpus", help="slurm: GPUs per job"),
          cpus: Optional[int] = typer.Option(None, "--cpus", help="slurm: CPUs per job"),
          mem: Optional[str] = typer.Option(None, "--mem", help="slurm: memory per job, e.g. 16G"),
          parallel: Optional[int] = typer.Option(None, "--parallel", help="slurm: at most N jobs running at once"),
          sbatch: List[str] = typer.Option([], "--sbatch", help="slurm: any other sbatch option, KEY=VALUE"),
          params: Path = ParamsOpt):
    """Queue a grid of DVC experiments (dvc exp run --queue -S ...), one per combination and seed.

    Values left out come from params.yaml. Everything is validated before anything is queued.
    A full table is two commands: `longtail sweep ... --run` then `longtail report`.
    On a cluster: `--executor slurm` (README: Running a sweep on a cluster)."""
    from . import sweep as sw

    if status:
        from . import slurm

        slurm.check_executor(executor)
        from .checks import yaml_file
        from .params import experiment_name

        slurm.status(name, experiment_name(yaml_file(params, f"params file {params}") if params.exists() else {}),
                     echo=typer.echo)
        return
    flags = {"partition": partition, "time": time_limit, "gpus": gpus, "cpus": cpus, "mem": mem, "parallel": parallel}
    if executor == "local" and (any(v is not None for v in flags.values()) or sbatch):
        raise LongtailError("--partition/--time/--gpus/--cpus/--mem/--parallel/--sbatch are for --executor slurm")
    rc = sw.main(params, losses=sw.split_list(loss, "loss"), methods=sw.split_list(method, "method"),
                 datasets=sw.split_list(dataset, "dataset"), imbalances=sw.split_list(imbalance, "imbalance"),
                 ratios=sw.split_list(ratio, "ratio"), seeds=seeds, extra=set_param, name=name, run=run,
                 jobs=jobs, dry_run=dry_run, echo=typer.echo, executor=executor, slurm_flags=flags, sbatch=sbatch)
    if rc:
        raise typer.Exit(rc)


@app.command()
def bench(device: str = typer.Option("auto", help="auto | cpu | cuda"),
          steps: int = typer.Option(20, min=1, help="timed training steps per pipeline"),
          workers: int = typer.Option(2, min=0, help="DataLoader workers of the reference pipeline"),
          compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                                 help="torch.compile the fast path (default: on CUDA only)")):
    """Benchmark: images/s and projected 200-epoch time, fast path vs reference DataLoader pipeline."""
    from .bench import run
    from .params import DEVICES

    if device not in DEVICES:
        raise LongtailError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    run(device, steps=steps, workers=workers, compile_=compile)


@plugins_app.command("list")
def plugins_list(group: Optional[str] = typer.Argument(None, help="only this group (losses, samplers, ...)")):
    """List installed plugins without importing them; exit 1 if any is broken or clashes."""
    from . import registry

    if group is not None and group not in registry.GROUPS:
        raise LongtailError(f"unknown plugin group {group!r} (valid: {', '.join(registry.GROUPS)})")
    found = registry.discover(group)
    _print_plugins(found)
    if any(p.problem for p in found):
        raise typer.Exit(1)


@plugins_app.command("check")
def plugins_check():
    """Import every plugin for real (slower); exit 1 if any fails."""
    from . import registry

    found = registry.check_all()
    _print_plugins(found)
    if any(p.problem for p in found):
        raise typer.Exit(1)


@plugins_app.command("new")
def plugins_new(name: str = typer.Argument(..., help="the loss name, e.g. my_loss"),
                dest: Optional[Path] = typer.Option(None, help="where to write it (default plugins/longtail-NAME)"),
                params: Path = ParamsOpt):
    """Scaffold a new loss plugin package (pyproject with the entry point, loss module, contract test)."""
    from .scaffold import new_loss

    out = new_loss(name, dest or Path("plugins") / f"longtail-{name.replace('_', '-')}", params)
    section = f"losses.{name} is in {params}" if params.exists() else f"no {params} here, so no losses.{name} section"
    typer.echo(f"wrote {out} ({section}); next: pip install -e {out} && pytest {out} && dvc exp run -S loss={name}")


@plugins_app.command("add")
def plugins_add(name: str = typer.Argument(..., help="an installed plugin, e.g. smooth_ce"), params: Path = ParamsOpt):
    """Write a plugin's params section into params.yaml with its build defaults (optional: a selected
    plugin without a section runs with its defaults)."""
    from .scaffold import add_plugin

    key, values = add_plugin(name, params)
    typer.echo(f"{params}: added {key}: {values}")


def _print_plugins(found) -> None:
    width = max([len(p.name) for p in found] + [4])
    group = None
    for p in found:
        if p.group != group:
            group = p.group
            typer.echo(f"longtail.{group}:")
        status = f"  BROKEN: {p.problem}" if p.problem else ""
        typer.echo(f"  {p.name:<{width}}  {p.value}  [{p.dist}]{status}")


# the commands that dvc.yaml runs: each must run the code that DVC hashed for it
STAGE_COMMANDS = ("build-dataset", "pretrain", "finetune", "evaluate")
PROJECT_CODE_ENV = "LONGTAIL_PROJECT_CODE"


def _run_the_projects_own_code() -> None:
    """A stage run in a project folder whose pipeline/ is not the imported package (a DVC queue's
    temporary copy of an experiment, or a clone beside a non-editable install) re-executes itself on
    that folder's code: the stages' DVC dependencies are those files, so a queued experiment must not
    run whatever code the installed package points at by the time it starts."""
    if len(sys.argv) < 2 or sys.argv[1] not in STAGE_COMMANDS or os.environ.get(PROJECT_CODE_ENV):
        return
    here = Path.cwd() / "pipeline"
    if not ((here / "cli.py").is_file() and (here / "stages").is_dir() and (Path.cwd() / "dvc.yaml").is_file()):
        return
    if here.resolve() == Path(__file__).resolve().parent:
        return
    os.environ[PROJECT_CODE_ENV] = str(here)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "pipeline.cli", *sys.argv[1:]])


def main() -> None:
    _run_the_projects_own_code()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    interrupts.install()
    try:
        app()  # typer turns a KeyboardInterrupt (Ctrl-C, or Terminated) into exit 130
    except LongtailError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (SystemExit, KeyboardInterrupt) as exc:
        if interrupts.terminated():
            print("terminated (SIGTERM)", file=sys.stderr)
            sys.exit(143)
        if isinstance(exc, KeyboardInterrupt) or exc.code == 130:
            print("interrupted (Ctrl-C)", file=sys.stderr)
            sys.exit(130)
        raise
    except OSError as exc:
        if not exc.filename:  # not about a path: a bug, shown with its traceback
            raise
        # a path the OS refused (a file where a folder must be, a folder not writable, a full disk):
        # the outputs are written atomically, so the previous ones are whole; name the path and why
        both = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else exc.filename
        print(f"error: {both}: {exc.strerror or exc.__class__.__name__}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        if not _is_store_error(exc):
            raise
        from .tracking import tracking_uri

        why = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        print(f"error: the MLflow store {tracking_uri()} cannot be read ({why}): restore it from a backup, or move "
              "it aside and a new, empty store is made on the next run", file=sys.stderr)
        sys.exit(2)


def _is_store_error(exc: BaseException) -> bool:
    """A corrupt or foreign MLflow store (sqlite3's or SQLAlchemy's DatabaseError, e.g. 'file is not a
    database', 'database disk image is malformed'), checked by name so that neither is imported here."""
    return any(c.__name__ == "DatabaseError" and c.__module__.split(".")[0] in ("sqlite3", "sqlalchemy")
               for c in type(exc).__mro__)


if __name__ == "__main__":
    main()
