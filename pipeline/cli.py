"""The `longtail` command line. Each pipeline stage is one subcommand that reads params.yaml.

Start-up stays fast: torch, mlflow and the stage modules are imported inside the commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import LongtailError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Long-tailed image classification: build dataset -> pretrain -> DRW fine-tune -> evaluate.")
plugins_app = typer.Typer(no_args_is_help=True, help="List, check and scaffold method plugins.")
app.add_typer(plugins_app, name="plugins")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="the params file")
NoTrack = typer.Option(False, "--no-track", help="do not log this stage to MLflow")


def _stage(name: str, params_path: Path, no_track: bool, fn):
    from .params import load
    from .tracking import stage_run

    p = load(params_path)
    if no_track:
        return fn(p, None)
    with stage_run(name, p.raw, p.experiment) as log:
        return fn(p, log)


@app.command("build-dataset")
def build_dataset(params: Path = ParamsOpt, no_track: bool = NoTrack):
    """Stage 1: the long-tailed train split + balanced test split -> data/prepared/."""
    from .stages import build_dataset as stage

    _stage("build-dataset", params, no_track, lambda p, log: stage.run(p, log=log))


@app.command()
def pretrain(params: Path = ParamsOpt, no_track: bool = NoTrack):
    """Stage 2: train epochs [0, finetune.start_epoch) -> models/pretrain.pt."""
    from .stages import training

    _stage("pretrain", params, no_track, lambda p, log: training.run("pretrain", p, log=log))


@app.command()
def finetune(params: Path = ParamsOpt, no_track: bool = NoTrack):
    """Stage 3: resume models/pretrain.pt with deferred re-balancing -> models/final.pt."""
    from .stages import training

    _stage("finetune", params, no_track, lambda p, log: training.run("finetune", p, log=log))


@app.command()
def evaluate(params: Path = ParamsOpt, no_track: bool = NoTrack):
    """Stage 4: per-class evaluation (final and best epoch) -> metrics/eval.json, plots/."""
    from .stages import evaluate as stage

    _stage("evaluate", params, no_track, lambda p, log: stage.run(p, log=log))


@app.command()
def check(params: Path = ParamsOpt):
    """Validate params.yaml (keys, values, plugin names) without running anything."""
    from .params import load

    p = load(params)
    typer.echo(f"{params}: ok (dataset={p.dataset}, {p.imbalance} r={p.ratio:g}, loss={p.loss}, "
               f"epochs={p.train.epochs}, finetune from {p.finetune.start_epoch})")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo(ctx: typer.Context,
         temp: bool = typer.Option(True, "--temp/--workspace",
                                   help="run in a temporary copy (default) or in this workspace")):
    """Run the whole pipeline as a DVC experiment on the embedded digits data (about 2 minutes on 2 cores).

    Extra arguments go to `dvc exp run`, e.g. `longtail demo -S loss=ldam`."""
    cmd = ["dvc", "exp", "run", "-S", "dataset=digits", *(["--temp"] if temp else []), *ctx.args]
    typer.echo("$ " + " ".join(cmd), err=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        raise typer.Exit(rc)
    subprocess.call(["dvc", "exp", "show", "--no-pager", "--drop", ".*",
                     "--keep", r"Experiment|^loss$|final\.top1|final\.few|best\.top1|best\.epoch"])
    typer.echo("Browse the runs: mlflow ui --backend-store-uri sqlite:///mlflow.db", err=True)


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
    typer.echo(f"wrote {out}; next: pip install -e {out} && pytest {out} && dvc exp run -S loss={name}")


def _print_plugins(found) -> None:
    width = max([len(p.name) for p in found] + [4])
    group = None
    for p in found:
        if p.group != group:
            group = p.group
            typer.echo(f"longtail.{group}:")
        status = f"  BROKEN: {p.problem}" if p.problem else ""
        typer.echo(f"  {p.name:<{width}}  {p.value}  [{p.dist}]{status}")


def main() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        app()
    except LongtailError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
