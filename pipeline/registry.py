"""Entry-point registry: every method (built-in or third-party) is found the same way.

Listing reads package metadata and the plugin's source text only; it never imports the plugin
(so ``longtail plugins list`` stays fast and torch-free). ``load`` imports one plugin on demand.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import sys
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points

from . import interrupts
from .errors import LongtailError, unknown

# group suffix -> what a plugin of that group builds (shown by `longtail plugins list`)
GROUPS = {
    "losses": "build(class_counts, **params) -> nn.Module with forward(logits, target, class_weight=None) and .head",
    "reweighting": "build(class_counts, **params) -> list[float] per-class weights",
    "samplers": "build(class_counts, **params) -> sampler with .indices(labels, epoch, epochs, generator)",
    "models": "build(num_classes, in_channels, head, **params) -> nn.Module with .features(x) and .classifier",
    "finetune": "build(**params) -> strategy with .run(context) for the fine-tune stage (and, if it needs the "
                "whole stage-1 schedule first, after_full_stage_one = True; if it picks its own batches and "
                "weights, uses_finetune_rebalancing = False)",
}
# the classifiers a loss may ask for with `.head` (the loss contract: pipeline.plugin_kit, which exports this list)
LOSS_HEADS = ("linear", "linear_nobias", "cosine")
# the user-facing key that selects a plugin of each group, for error messages
SELECTOR = {
    "losses": "loss",
    "reweighting": "train.reweighting / finetune.reweighting",
    "samplers": "train.sampler / finetune.sampler",
    "models": "model.arch",
    "finetune": "finetune.strategy",
}


@dataclass
class Plugin:
    group: str
    name: str
    value: str  # "module:attr"
    dist: str
    problem: str = ""  # empty when the plugin looks loadable


_CACHE: dict = {}  # (kind, group, sys.path) -> result: discovery runs once per process (per sys.path)


def _cached(kind: str, group: str, make):
    key = (kind, group, tuple(sys.path))
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _entry_points(group: str):
    return _cached("eps", group, lambda: tuple(entry_points(group=f"longtail.{group}")))


def _find_spec(module: str):
    """importlib.util.find_spec without importing the parent packages (which would run their code, and
    raise whatever it raises): each submodule is looked up in its parent's search locations."""
    parts = module.split(".")
    spec = None
    for i in range(len(parts)):
        name, parent = ".".join(parts[:i + 1]), ".".join(parts[:i])
        if not parent or parent in sys.modules:
            spec = importlib.util.find_spec(name)  # imports nothing: top level, or the parent is imported
        elif spec is None or spec.submodule_search_locations is None:
            return None  # the parent is missing or not a package
        else:
            path = list(spec.submodule_search_locations)
            spec = next((s for finder in sys.meta_path if hasattr(finder, "find_spec")
                         for s in [finder.find_spec(name, path)] if s is not None), None)
    return spec


def _static_problem(value: str) -> str:
    """Find what makes an entry point unloadable without running its code."""
    module, _, attr = value.partition(":")
    if not module or not attr:
        return f"entry point {value!r} is not of the form 'module:function'"
    try:
        spec = _find_spec(module)
    except Exception as exc:  # a finder's own failure: the plugin is unusable, listing goes on
        return f"module {module!r} cannot be found ({exc.__class__.__name__}: {exc})"
    if spec is None:
        return f"module {module!r} is not installed"
    if not spec.origin or not spec.origin.endswith(".py"):
        return ""  # compiled or namespace module: only a real load can tell
    try:
        with open(spec.origin, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), filename=spec.origin)
    except (OSError, SyntaxError, ValueError) as exc:
        return f"module {module!r} does not parse ({exc.__class__.__name__}: {exc})"
    top = attr.split(".")[0]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == top:
            return ""
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == top for t in targets):
                return ""
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name.split(".")[0]) == top for a in node.names):
                return ""
    return f"module {module!r} defines no {top!r}"


def discover(group: str | None = None) -> list[Plugin]:
    """All installed plugins (of one group or all), with problems found statically and name clashes."""
    groups = [group] if group else list(GROUPS)
    return [dataclasses.replace(p) for g in groups for p in _cached("discover", g, lambda g=g: _discover(g))]


def _discover(g: str) -> list[Plugin]:
    found: list[Plugin] = []
    seen: dict[str, Plugin] = {}
    for ep in _entry_points(g):
        dist = ep.dist.name if ep.dist else "?"
        plugin = Plugin(g, ep.name, ep.value, dist, _static_problem(ep.value))
        if ep.name in seen and seen[ep.name].value != ep.value:
            clash = f"name clash: {g} {ep.name!r} is declared by {seen[ep.name].dist} and {dist}"
            plugin.problem = plugin.problem or clash
            seen[ep.name].problem = seen[ep.name].problem or clash
        seen.setdefault(ep.name, plugin)
        found.append(plugin)
    return found


def names(group: str) -> list[str]:
    return sorted({p.name for p in discover(group)})


def check_name(group: str, name: str) -> None:
    """Raise a one-line error if `name` is not an installed, unique plugin of `group`."""
    matches = [p for p in discover(group) if p.name == name]
    if not matches:
        raise unknown(SELECTOR[group].split(" / ")[0] if group != "losses" else "loss", name, names(group))
    if matches[0].problem:
        raise LongtailError(f"{group} plugin {name!r} ({matches[0].dist}) is broken: {matches[0].problem}")


def _entry_point(group: str, name: str):
    """The entry point of an installed plugin, and how errors name it: "losses plugin 'x' (dist, mod:fn)"."""
    (ep,) = [ep for ep in _entry_points(group) if ep.name == name][:1]
    return ep, f"{group} plugin {name!r} ({ep.dist.name if ep.dist else '?'}, {ep.value})"


@contextmanager
def _plugin_code(which: str, doing: str):
    """Run a plugin's own code (its import, its build): whatever it raises is one line naming the plugin,
    LongtailError (its own check of its params) as it is. SystemExit (a `sys.exit("needs libfoo")` at
    import) is a failure of the plugin, not the command's exit; so is a KeyboardInterrupt that the plugin
    raised itself, while a real Ctrl-C or SIGTERM (the CLI's handler records it) still interrupts."""
    signals = interrupts.received()
    try:
        yield
    except LongtailError:
        raise
    except KeyboardInterrupt as exc:
        if interrupts.received() != signals or not interrupts.installed():
            raise  # a real Ctrl-C / SIGTERM (or a Ctrl-C no handler would count)
        raise LongtailError(f"{which} failed to {doing}: {exc.__class__.__name__}: {exc}") from exc
    except BaseException as exc:  # a broken third-party package must not crash with a traceback, nor exit
        raise LongtailError(f"{which} failed to {doing}: {exc.__class__.__name__}: {exc}") from exc


def load(group: str, name: str):
    """Import and return a plugin's build function; any failure is one clear line."""
    check_name(group, name)
    ep, which = _entry_point(group, name)
    with _plugin_code(which, "import"):
        fn = ep.load()
    if not callable(fn):
        raise LongtailError(f"{which} is not callable: {ep.value} is of type {type(fn).__name__}, not a build function")
    return fn


def bind(fn, args: tuple, params: dict, param_key: str) -> None:
    """Check params against a build function's signature (inspect.signature(...).bind): an unknown key
    names the closest accepted one, a missing required one is named. One line, no call."""
    from .checks import closest, params_file

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: only a call can tell
        return
    accepted = [n for n, p in sig.parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][len(args):]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    for key in params:
        if not isinstance(key, str) or (key not in accepted and not takes_any):
            raise LongtailError(f"unknown key {param_key}.{key} in {params_file()}"
                                f"{closest(str(key), accepted, param_key + '.')}")
    try:
        sig.bind(*args, **params)
    except TypeError as exc:
        raise LongtailError(f"bad parameters under {param_key}: {exc}") from None


def build(group: str, name: str, *args, params: dict | None = None, param_key: str = ""):
    """Load a plugin, bind its params to its build signature, call it, and check what it returned as the
    stages need it (`check_built`): `longtail check` and the stages build through here alike."""
    fn = load(group, name)
    params = dict(params or {})
    bind(fn, args, params, param_key or f"{group}.{name}")
    which = _entry_point(group, name)[1]
    with _plugin_code(which, "build"):
        built = fn(*args, **params)
    check_built(group, which, built, args)
    try:
        _BUILT[built] = which
    except TypeError:  # not weakly referable or not hashable (a list of weights): errors name its type
        pass
    return built


# the objects `build` returned -> how errors name their plugin ("samplers plugin 'x' (dist, mod:fn)")
_BUILT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def describe(obj) -> str:
    """How an error names the plugin that built `obj` (a loss, a sampler), else its type."""
    try:
        return _BUILT[obj]
    except (KeyError, TypeError):
        return f"{type(obj).__module__}.{type(obj).__qualname__}"


def check_built(group: str, which: str, built, args: tuple) -> None:
    """What a stage needs of a built plugin, beyond its own value checks: something (not None); a loss's
    `head` one of LOSS_HEADS; one re-weighting per class. One line naming the plugin and what it gave."""
    if built is None:
        raise LongtailError(f"{which} returned None from build; it must return {GROUPS[group].split(' -> ', 1)[1]}")
    if group == "losses":
        head = getattr(built, "head", None)
        if head not in LOSS_HEADS:
            raise LongtailError(f"{which} declares head {head!r} (valid: {', '.join(LOSS_HEADS)})")
    elif group == "reweighting":
        try:
            n = len(built)
        except TypeError:
            raise LongtailError(f"{which} returned a {type(built).__name__}, not a list of per-class weights") from None
        if n != len(args[0]):
            raise LongtailError(f"{which} returned {n} weights for {len(args[0])} classes")


def defaults(group: str, name: str) -> dict:
    """The keyword parameters of a plugin's build function with their defaults (for `plugins add`)."""
    sig = inspect.signature(load(group, name))
    return {n: p.default for n, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_all() -> list[Plugin]:
    """Import every plugin for real (slow: imports torch); returns them with load errors filled in."""
    plugins = discover()
    for p in plugins:
        if p.problem:
            continue
        try:
            load(p.group, p.name)
        except LongtailError as exc:
            p.problem = str(exc)
    return plugins


# the params keys (dotted) that select a plugin of each group
SELECTING_KEYS = {"losses": ("loss",), "reweighting": ("train.reweighting", "finetune.reweighting"),
                  "samplers": ("train.sampler", "finetune.sampler"), "models": ("model.arch",),
                  "finetune": ("finetune.strategy",)}


def plugin_versions(raw: dict, core: str = "longtail") -> dict[str, str]:
    """{distribution: version} of the third-party plugin packages that raw params select (e.g.
    {"longtail-mm": "0.1.0"}): they live outside the repository, so a run records them (metadata only,
    nothing imported). Built-ins (the `core` distribution) are pinned by the git commit."""
    def get(key):
        node = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    out = {}
    for group, keys in SELECTING_KEYS.items():
        wanted = {str(get(k)) for k in keys if get(k) is not None}
        for ep in _entry_points(group):
            if ep.name in wanted and ep.dist is not None and ep.dist.name != core:
                out[ep.dist.name] = ep.dist.version
    return dict(sorted(out.items()))
