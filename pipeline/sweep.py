"""`longtail sweep`: queue a grid of DVC experiments, one per combination of the given values and
seed (`dvc exp run --queue -S key=value ...`), and optionally run the queue and wait for it.

Every combination is validated against params.yaml (the same checks as `longtail check`) before
anything is queued, so a typo fails at once with one line instead of N queued failures."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import tools
from .checks import yaml_value
from .errors import LongtailError, unknown

QUEUED = re.compile(r"Queued experiment '([^']+)'")
DONE_STATES = ("Success", "Failed")


@dataclass
class Combo:
    sets: list  # [(key, value string)] in -S order
    label: str  # what the combination varies, for printing

    def args(self) -> list[str]:
        return [a for k, v in self.sets for a in ("-S", k if k.startswith("~") and not v else f"{k}={v}")]


def split_list(text: str | None, what: str) -> list[str]:
    if text is None:
        return []
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise LongtailError(f"--{what} needs at least one value (comma-separated)")
    return list(dict.fromkeys(items))


_value = yaml_value  # a -S value as DVC (Hydra) reads it: YAML, with 1e-3 style numbers


def _text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}" if math.isfinite(v) and v == int(v) and abs(v) < 1e15 else repr(v)
    if isinstance(v, (list, dict)):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    return str(v)


SET_FORMS = ("KEY=VALUE (a params.yaml key with dots), +KEY=VALUE to add a key, ~KEY (or ~KEY=its value) to remove "
             "an optional one")


def parse_set(items) -> list[tuple[str, str]]:
    out, grammar = [], None
    for item in items or []:
        key, sep, value = item.partition("=")
        remove = key.strip().startswith("~")  # ~KEY, or ~KEY=VALUE (only while the key has that value); DVC refuses ~KEY=
        if (not sep and not remove) or (remove and sep and not value) or not key.strip("+~ "):
            raise LongtailError(f"-S takes {SET_FORMS}, got {item!r}")
        if grammar is None:
            from hydra.core.override_parser.overrides_parser import OverridesParser

            grammar = OverridesParser.create()
        _check_grammar(grammar, item, key.strip(), value)
        out.append((key.strip(), value))
    return out


def _check_grammar(grammar, item: str, key: str, value: str) -> None:
    """DVC reads each -S with Hydra's override grammar: a value it cannot parse (`[x`) failed only when
    DVC ran, with DVC's support footer as the message; a sweep value (`a,b`) made DVC queue one
    experiment per value, unchecked."""
    from hydra.errors import OverrideParseException

    quoted = f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'
    try:
        override = grammar.parse_overrides([item])[0]
    except OverrideParseException as exc:
        why = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LongtailError(f"-S {item!r} is not valid in DVC's -S syntax (Hydra's override grammar: {why}); "
                            f"quote a value that holds brackets, braces, commas or quotes: -S \"{quoted}\"") from None
    if override.is_sweep_override():
        raise LongtailError(f"-S {item!r} is a Hydra sweep (one DVC experiment per value), which -S here does not "
                            f"take: give the grid with --loss/--method/--dataset/--imbalance/--ratio/--seeds, or "
                            f"quote a value that holds a comma: -S \"{quoted}\"")


def _set(raw: dict, key: str, value) -> None:
    add = key.startswith("+")
    path = key.lstrip("+").split(".")
    node = raw
    for i, k in enumerate(path[:-1]):
        if not isinstance(node.get(k), dict):
            if not add:
                raise LongtailError(f"-S {key}: params.yaml has no key {'.'.join(path[:i + 1])!r} "
                                    f"(prefix the key with + to add one)")
            node[k] = {}
        node = node[k]
    if path[-1] not in node and not add:
        raise LongtailError(f"-S {key}: params.yaml has no key {'.'.join(path)!r} (prefix the key with + to add one)")
    node[path[-1]] = value


def _remove(raw: dict, key: str, value: str = "") -> None:
    """~KEY removes the key; ~KEY=VALUE only while it has that value (Hydra's rule, which DVC applies)."""
    path = key.lstrip("~").split(".")
    if not _has(raw, ".".join(path)):
        raise LongtailError(f"-S {key}: params.yaml has no key {'.'.join(path)!r} to remove")
    node = raw
    for k in path[:-1]:
        node = node[k]
    if value and node[path[-1]] != _value(value):
        raise LongtailError(f"-S {key}={value}: {'.'.join(path)} is {node[path[-1]]!r}, not {_value(value)!r} "
                            f"(~KEY=VALUE removes a key only while it has that value; ~KEY removes it whatever it is)")
    del node[path[-1]]


def apply_sets(base: dict, sets) -> dict:
    """A copy of a params mapping with -S overrides applied in order, as DVC applies them."""
    raw = copy.deepcopy(base)
    for k, v in sets:
        if k.startswith("~"):
            _remove(raw, k, v)
        else:
            _set(raw, k, _value(v))
    return raw


def check_sets(base: dict, sets, raw: dict | None = None) -> dict:
    """The params that -S overrides give (`raw`, when already applied), validated as `longtail check`
    does; a removal (~KEY) of a key the params need is named as the override at fault."""
    from .params import check_plugins, parse

    raw = apply_sets(base, sets) if raw is None else raw
    try:
        check_plugins(parse(raw))
    except LongtailError as exc:
        removed = [k for k, _ in sets if k.startswith("~")]
        if removed:
            try:
                check_plugins(parse(apply_sets(base, [kv for kv in sets if not kv[0].startswith("~")])))
            except LongtailError:
                raise exc from None
            raise LongtailError(f"-S {' '.join(removed)}: cannot remove a key the params need ({exc}); "
                                f"-S takes {SET_FORMS}") from None
        raise
    return raw


def _has(raw: dict, key: str) -> bool:
    node = raw
    for k in key.split("."):
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return True


def build_grid(base: dict, *, losses=(), methods=(), datasets=(), imbalances=(), ratios=(), seeds: int = 1,
               extra=()) -> list[Combo]:
    """The combinations, each validated; raises LongtailError before anything is queued."""
    from . import registry
    from .method_names import MethodNames
    from .data import SOURCE_PROFILE
    from .params import DATASETS, IMBALANCES

    if losses and methods:
        raise LongtailError("give --loss or --method, not both (a method fixes its loss)")
    valid_losses = registry.names("losses")
    for loss in losses:
        if loss not in valid_losses:
            raise unknown("loss", loss, valid_losses)
    names = MethodNames.load()
    for m in methods:
        if m not in names.names:
            raise LongtailError(f"unknown method {m!r} (valid: {', '.join(names.names)})")
    for d in datasets:
        if d not in DATASETS:
            raise unknown("dataset", d, DATASETS)
    for i in imbalances:
        if i not in IMBALANCES:
            raise unknown("imbalance profile", i, IMBALANCES)
    ratio_values = []
    for r in ratios:
        try:
            v = float(r)
        except ValueError:
            raise LongtailError(f"--ratio values must be numbers >= 1, got {r!r}") from None
        if not math.isfinite(v) or v < 1:
            kind = "numbers" if math.isfinite(v) else "finite numbers"
            raise LongtailError(f"--ratio values must be {kind} >= 1, got {r!r}")
        ratio_values.append(_text(v))
    extra = list(extra)
    profiles = imbalances or [str(v) for k, v in extra if k.lstrip("+") == "imbalance"] or [base.get("imbalance")]
    if ratio_values and SOURCE_PROFILE in profiles:
        raise LongtailError("--ratio does not apply to imbalance source (it keeps the source's own counts): "
                            "sweep the source profile without --ratio")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise LongtailError(f"--seeds is the number of seeds (0..n-1) and must be >= 1, got {seeds!r}")

    axes = []  # per axis: the choices, each (label, [(key, value)])
    if methods:  # keys params.yaml lacks (e.g. a plugin's section) are added: +key=value
        axes.append([(m, [(k if _has(base, k) else f"+{k}", _text(v)) for k, v in names.full(m).items()])
                     for m in methods])
    if losses:
        axes.append([(f"loss={x}", [("loss", x)]) for x in losses])
    for key, values in (("dataset", datasets), ("imbalance", imbalances), ("ratio", ratio_values)):
        if values:
            axes.append([(f"{key}={v}", [(key, v)]) for v in values])
    seed_axis = [(f"seed={s}", [("seed", str(s))]) for s in range(seeds)]
    grid_keys = {k for axis in (*axes, seed_axis) for _, choice in axis for k, _ in choice}
    clash = sorted({k.lstrip("+~") for k, _ in extra} & {k.lstrip("+") for k in grid_keys})
    if clash:
        raise LongtailError(f"-S {clash[0]} clashes with the grid (set by --method/--loss/--dataset/--imbalance/"
                            f"--ratio/--seeds): leave it to the grid")

    combos, checked = [], set()
    # Seed-major: every combination's seed 0 is queued before any seed 1, so a queue that is stopped
    # early (a time limit, a GPU lease) has finished one whole table first, not all seeds of a few rows.
    for seed_choice, *rest in itertools.product(seed_axis, *axes):
        choice = (*rest, seed_choice)
        sets = [kv for _, part in choice for kv in part] + extra
        label = " ".join(lbl for lbl, _ in choice)
        raw = apply_sets(base, sets)
        key = json.dumps({k: v for k, v in raw.items() if k != "seed"}, sort_keys=True, default=str)
        if key not in checked:  # the seeds 0..n-1 are valid; validate each other combination once
            checked.add(key)
            try:
                check_sets(base, sets, raw)
            except LongtailError as exc:
                raise LongtailError(f"{label}: {exc}") from None
        combos.append(Combo(sets, label))
    return combos


def _dvc(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    tools.require("dvc")
    out = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise LongtailError(f"`dvc {' '.join(args)}` failed: "
                            f"{tools.why_failed(out.returncode, out.stderr, out.stdout)}")
    return out


def queue(combos: list[Combo], name: str | None = None, echo=print) -> list[str]:
    """`dvc exp run --queue` each combination; returns the experiment names DVC gave them."""
    names = []
    for i, c in enumerate(combos):
        args = ["exp", "run", "--queue", *(["-n", f"{name}-{i}"] if name else []), *c.args()]
        out = _dvc(args)
        m = QUEUED.search(out.stdout + out.stderr)
        exp = m.group(1) if m else (f"{name}-{i}" if name else "?")
        names.append(exp)
        echo(f"queued {exp}: {c.label}")
    return names


def queue_status() -> dict[str, str]:
    """Experiment name -> Queued / Running / Success / Failed. Asks DVC in-process (about 0.1 s; the
    `dvc queue status` command costs seconds of CPU per call, taken from the experiments it waits for)
    and falls back to parsing that command's table."""
    try:
        from dvc.repo import Repo

        with Repo(".") as repo:
            return {e["name"]: e["status"] for e in repo.experiments.celery_queue.status() if e.get("name")}
    except Exception:  # another DVC version: use the command line
        pass
    out = _dvc(["queue", "status"], check=False)
    states = {}
    for line in out.stdout.splitlines():
        tok = line.split()
        if len(tok) >= 3 and tok[-1] in ("Queued", "Running", *DONE_STATES):
            states[tok[1]] = tok[-1]
    return states


def start_queue(jobs: int) -> None:
    """`dvc queue start -j N`. Its output goes to a file, not a pipe: the detached workers inherit the
    command's output handles, and a pipe would stay open (and block the reader) until they exit."""
    tools.require("dvc")
    with tempfile.TemporaryFile("w+") as fh:
        rc = subprocess.call(["dvc", "queue", "start", "-j", str(jobs)], stdout=fh, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        if rc != 0:
            fh.seek(0)
            raise LongtailError(f"`dvc queue start -j {jobs}` failed: {tools.why_failed(rc, fh.read())}")


STALL_POLLS = 6  # polls with experiments queued and none running anywhere before the workers count as gone
RESTARTS = 3  # worker restarts before giving up with an error


def run_and_wait(names: list[str], jobs: int = 1, poll: float = 5.0, echo=print, status=queue_status,
                 sleep=time.sleep) -> dict:
    """`dvc queue start -j N`, then wait until every named experiment succeeded or failed. Between
    polls it sleeps `poll` seconds, or 20x the CPU time the last status check took if that is longer,
    so waiting costs at most ~5% of a core (a status check grows with the queue: it took about 1.5 s
    of CPU per call with a dozen experiments, 30% of a core at a 5 s poll, taken from the training).
    DVC's queue worker can exit with experiments still queued (its file broker read an empty message
    file: JSONDecodeError in .dvc/tmp/exps/celery/dvc-exp-worker-*.out); then nothing would ever run
    them. When some of ours stay queued and nothing runs for STALL_POLLS polls, the workers are
    started again (RESTARTS times, then an error)."""
    start_queue(jobs)
    echo(f"started {jobs} queue worker(s); waiting for {len(names)} experiment(s) (Ctrl-C stops waiting, "
         "not the queue)")
    last: dict = {}
    missing_polls = stalled = restarts = 0
    while True:
        cpu = time.process_time()
        states = status()
        cost = time.process_time() - cpu
        now = {n: states.get(n, "?") for n in names}
        for n, s in now.items():
            if s != last.get(n):
                echo(f"  {n}: {s}")
        last = now
        if all(s in DONE_STATES for s in now.values()):
            return now
        missing_polls = missing_polls + 1 if all(s in (*DONE_STATES, "?") for s in now.values()) else 0
        if missing_polls >= 6:  # left the queue without a result (removed, or the queue was reset)
            return now
        queued = [n for n, st in now.items() if st == "Queued"]
        stalled = stalled + 1 if queued and "Running" not in states.values() else 0
        if stalled >= STALL_POLLS:
            if restarts == RESTARTS:
                raise LongtailError(f"the DVC queue workers keep exiting with {len(queued)} experiment(s) still queued "
                                    f"({', '.join(queued)}): see .dvc/tmp/exps/celery/dvc-exp-worker-*.out; "
                                    f"`dvc queue start -j {jobs}` runs the rest")
            echo(f"  no queue worker runs anything and {len(queued)} experiment(s) are still queued "
                 f"(a DVC queue worker exited); starting {jobs} worker(s) again")
            start_queue(jobs)
            restarts, stalled = restarts + 1, 0
        sleep(max(poll, 20 * cost))


def main(params: Path, *, losses, methods, datasets, imbalances, ratios, seeds, extra, name, run, jobs,
         dry_run, echo=print, executor: str = "local", slurm_flags: dict | None = None, sbatch=()) -> int:
    from .params import experiment_name, load

    if executor != "local":
        from . import slurm

        slurm.check_executor(executor)
    if not Path("dvc.yaml").exists():
        raise LongtailError("no dvc.yaml here: run `longtail sweep` from the project root")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise LongtailError(f"--name must be letters, digits, - and _, got {name!r}")
    if jobs < 1:
        raise LongtailError(f"-j/--jobs must be >= 1, got {jobs}")
    base = load(params).raw
    combos = build_grid(base, losses=losses, methods=methods, datasets=datasets, imbalances=imbalances,
                        ratios=ratios, seeds=seeds, extra=parse_set(extra))
    experiment = experiment_name(base)
    if executor == "slurm":
        return _slurm(base, combos, name, experiment, slurm_flags or {}, sbatch, run, dry_run, echo)
    if dry_run:
        for c in combos:
            echo("dvc exp run --queue " + " ".join(c.args()))
        return 0
    from .tracking import ensure_experiment

    tools.require("dvc")  # before the store is made
    ensure_experiment(experiment)
    names = queue(combos, name, echo)
    echo(f"{len(names)} experiment(s) queued")
    if not run:
        echo(f"run them: dvc queue start -j {jobs}   (then: longtail report)")
        return 0
    final = run_and_wait(names, jobs, echo=echo)
    failed = [n for n, s in final.items() if s != "Success"]
    echo(f"{len(names) - len(failed)} succeeded, {len(failed)} failed")
    for n in failed:
        echo(f"  {n}: {final[n]} (see `dvc queue logs {n}`)", )
    if not failed:
        echo("next: longtail report")
    sys.stdout.flush()
    return 1 if failed else 0


def _slurm(base: dict, combos: list[Combo], name, experiment: str, flags: dict, sbatch, run: bool, dry_run: bool,
           echo) -> int:
    """--executor slurm: one SLURM job per experiment (pipeline/slurm.py); with --run, wait for them."""
    from . import slurm

    opts = slurm.options(base.get("slurm"), flags, list(sbatch))
    if not dry_run:
        slurm.require("sbatch")
        from .tracking import ensure_experiment, tracking_uri

        slurm.ensure_server_experiment(experiment)
        ensure_experiment(experiment)
        if tracking_uri().startswith("sqlite:"):
            echo("note: the jobs log to the project's sqlite MLflow store; with jobs on several nodes set "
                 "MLFLOW_TRACKING_URI to the team's `mlflow server` (README: Running a sweep on a cluster)")
    sweep = slurm.submit(combos, name, opts, experiment, echo=echo, dry_run=dry_run)
    if dry_run or not run:
        if not dry_run:
            echo(f"watch it: longtail sweep --status --name {sweep.name}   (then: longtail report)")
        return 0
    echo(f"waiting for sweep {sweep.name} (Ctrl-C stops waiting, not the jobs)")
    rows = slurm.wait(sweep, echo=echo)
    slurm.print_status(sweep, rows, echo)
    failed = [r for r in rows if r.state != "done"]
    if not failed:
        echo("next: longtail report")
    return 1 if failed else 0
