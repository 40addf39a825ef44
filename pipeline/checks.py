"""The one home of the value checks and the YAML value reader that params, plugins and `-S` share.

- `check_number`: finite numbers only (NaN and inf are never valid settings), with bounds;
  `check_seed`: a seed every consumer of it accepts.
- `closest`: "did you mean train.epochs?" for a misspelled key.
- `yaml_load` / `yaml_value`: YAML as users type it and DVC reads it. PyYAML follows YAML 1.1, which
  reads `1e-3` (no dot) as a string, `1:30:00` as 5400 and `on` / `yes` as booleans; here numbers and
  booleans are YAML 1.2's, as in DVC's params.yaml and `-S`.
- `yaml_file`: a YAML file read and parsed, every problem (not UTF-8, a folder, unreadable, bad YAML)
  in one line.
"""

from __future__ import annotations

import difflib
import math
import re
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import yaml

from .errors import LongtailError


def check_number(key, value, *, min=None, above=None, max=None, below=None, integer=False):
    """Return value as float (int if `integer`) or raise LongtailError('losses.x.y must be >= 0, got -1')."""
    kind = "an integer" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise LongtailError(f"{key} must be {kind}, got {value!r}")
    if isinstance(value, int) and abs(value) >= 10 ** MAX_DIGITS:  # no float holds it (nor any setting needs it)
        raise LongtailError(f"{key} must be {'an integer' if integer else 'a number'} of at most {MAX_DIGITS} "
                            f"digits, got {shown(value)}")
    if not math.isfinite(value):
        raise LongtailError(f"{key} must be {kind}, got {value!r}")
    if min is not None and value < min:
        raise LongtailError(f"{key} must be >= {min}, got {shown(value)}")
    if above is not None and value <= above:
        raise LongtailError(f"{key} must be > {above}, got {shown(value)}")
    if max is not None and value > max:
        raise LongtailError(f"{key} must be <= {max}, got {shown(value)}")
    if below is not None and value >= below:
        raise LongtailError(f"{key} must be < {below}, got {shown(value)}")
    return int(value) if integer else float(value)


MAX_DIGITS = 308  # a float's range (1.8e308): a longer integer is no number a setting can use
# Seeds feed torch generators (up to 2**64 - 1) as seed, seed + 1 and seed * 100003 + epoch
# (pipeline/engine), and may feed numpy's RandomState (below 2**32): this range suits all of them.
SEED_MAX = 2**32 - 1


def check_seed(key, value) -> int:
    """A random seed: an integer in 0..SEED_MAX, or LongtailError('seed must be <= 4294967295, got ...')."""
    return check_number(key, value, min=0, max=SEED_MAX, integer=True)


def shown(value) -> str:
    """A number as a message shows it: floats as %g (1e-05), integers in full, a very long one by its length."""
    if not isinstance(value, int):
        return f"{value:g}"
    try:
        text = str(abs(value))
    except ValueError:  # longer than Python prints (sys.get_int_max_str_digits)
        return f"an integer of over {MAX_DIGITS} digits"
    return ("-" if value < 0 else "") + text if len(text) <= 40 else f"a {len(text)}-digit integer"


def closest(key, valid, prefix: str = "") -> str:
    """' (did you mean train.epochs?)' for the nearest valid key, or ' (valid: a, b, c)'. A key that
    YAML read as true, false or null (true, false, null, ~) says so: quoted, it is text."""
    valid = sorted(map(str, valid))
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6) if isinstance(key, str) else []
    if match:
        return f" (did you mean {prefix}{match[0]}?)"
    hint = ("; YAML reads null, ~ and an empty key as null and true / false as booleans: quote a key to keep it text"
            if key is None or isinstance(key, bool) else "")
    return f" (valid: {', '.join(valid) or 'none'}{hint})"


_PARAMS_FILE: ContextVar[str] = ContextVar("params_file", default="params.yaml")


def params_file() -> str:
    """The params file whose settings are being checked, as messages name it (`-p FILE`; else params.yaml)."""
    return _PARAMS_FILE.get()


@contextmanager
def checking(params_file: str):
    """Messages raised inside name this params file (`params.parse`, `params.check_plugins`)."""
    token = _PARAMS_FILE.set(str(params_file))
    try:
        yield
    finally:
        _PARAMS_FILE.reset(token)


def unknown_key(path: str, key, valid) -> LongtailError:
    prefix = f"{path}." if path else ""
    return LongtailError(f"unknown key {prefix}{key} in {params_file()}{closest(key, valid, prefix)}")


def find_non_finite(node, path: str = ""):
    """(dotted key, value) of the first NaN/inf number anywhere in a params tree, or None."""
    if isinstance(node, float) and not math.isfinite(node):
        return path or "(top level)", node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        found = find_non_finite(v, f"{path}[{k}]" if isinstance(node, list) else f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


MERGE_TAG = "tag:yaml.org,2002:merge"


MAX_NODES = 100_000  # values of a document with its aliases expanded: params files have a few hundred


class Loader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 floats (1e-3, 5E+2 and .5 are numbers) that refuses a key given
    twice in one mapping (PyYAML would keep the last one silently), and a document whose aliases
    expand to more than MAX_NODES values (a "billion laughs": nested anchors that PyYAML builds as
    shared objects, which every walk over the params then visits once per path, for minutes)."""

    def construct_document(self, node):
        _check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:  # `<<: *anchor` merges a mapping; its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base class refuses it with its own message
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice (first at line {first.start_mark.line + 1}); "
                                    "keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root) -> None:
    """Count the values of a composed document as if each alias were written out: a node's count is
    computed once (an anchored node is one object however often it is aliased), so this is quick."""
    sizes: dict = {}

    def size(node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a recursive alias (&a [*a]) counts once here; PyYAML builds it as a cycle
        if isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            n = 1
        if n > MAX_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"its aliases (*name) expand to more than {MAX_NODES:,} values; write the values out "
                            "or use fewer nested aliases", node.start_mark)
        sizes[id(node)] = n
        return n

    size(root)


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X)
# YAML 1.2 numbers and booleans, as DVC (ruamel) reads params.yaml: 1e-3 is a float (1.1: text), 1:30:00
# is text (1.1: 5400, base 60), 010 is ten (1.1: octal 8), and on / off / yes / no are text (1.1: booleans)
_INT = re.compile(r"^[-+]?(?:0b[01_]+|0o[0-7_]+|0x[0-9a-fA-F_]+|[0-9][0-9_]*)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_YAML_12 = ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int", "tag:yaml.org,2002:bool")
Loader.yaml_implicit_resolvers = {ch: [(tag, rx) for tag, rx in resolvers if tag not in _YAML_12]
                                  for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))


def _construct_int(loader, node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
    base = {"0b": 2, "0o": 8, "0x": 16}.get(digits[:2], 10)
    try:
        return sign * int(digits[2:] if base != 10 else digits, base)
    except ValueError as exc:  # no digits (0x_), or more than Python converts: a YAML error, one line
        raise yaml.constructor.ConstructorError(None, None, f"cannot read the integer {text[:20]!r}... ({exc})"
                                                if len(text) > 20 else f"cannot read the integer {text!r} ({exc})",
                                                node.start_mark) from None


Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
Loader.add_constructor("tag:yaml.org,2002:bool", lambda loader, node: loader.construct_scalar(node) in ("true", "True", "TRUE"))


def yaml_load(text: str):
    """yaml.safe_load with YAML 1.2 floats (never constructs objects)."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader


def yaml_problem(exc: Exception) -> str:
    """A YAML error in one line: 'line 12: found the key 'lr' twice ...' (PyYAML's own text spans lines)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    return f"line {mark.line + 1}: " + (f"{context}, {problem}" if context else problem)


def yaml_text(text: str, what: str):
    """yaml_load, or one LongtailError line naming `what` and the line of the mistake."""
    try:
        return yaml_load(text)
    except yaml.YAMLError as exc:
        raise LongtailError(f"{what} is not valid YAML ({yaml_problem(exc)})") from None


def yaml_file(path, what: str | None = None):
    """A YAML file's contents (yaml_load), or one LongtailError line naming `what` (default: the path)
    and why: not UTF-8 text, a folder, unreadable, or not valid YAML."""
    path, what = Path(path), what or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise LongtailError(f"{what} is not UTF-8 text (line {line}: byte 0x{e.object[e.start]:02x}); "
                            "save it as UTF-8") from None
    except IsADirectoryError:
        raise LongtailError(f"{what} is a directory, not a YAML file") from None
    except OSError as e:
        raise LongtailError(f"{what} cannot be read ({e.strerror or e})") from None
    return yaml_text(text, what)


_HYDRA_INT = re.compile(r"[-+]?(?:0|[1-9](?:_?[0-9])*)")


def yaml_value(text: str):
    """A `-S KEY=VALUE` value as DVC reads it: YAML, with 1e-3 style numbers; unparsable text stays text.
    DVC parses `-S` with Hydra's grammar, whose integers are plain decimals: 0128, 0x10 stay text there."""
    try:
        value = yaml_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, int) and not isinstance(value, bool) and not _HYDRA_INT.fullmatch(text.strip()):
        return text
    return value
