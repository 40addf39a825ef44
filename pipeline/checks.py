"""The one home of the value checks and the YAML value reader that params, plugins and `-S` share.

- `check_number`: finite numbers only (NaN and inf are never valid settings), with bounds.
- `closest`: "did you mean train.epochs?" for a misspelled key.
- `yaml_load` / `yaml_value`: YAML as users type it. PyYAML follows YAML 1.1, which reads `1e-3`
  (no dot) as a string; here it is a float, as in YAML 1.2 and in DVC's `-S`.
"""

from __future__ import annotations

import difflib
import math
import re

import yaml

from .errors import LongtailError


def check_number(key, value, *, min=None, above=None, max=None, below=None, integer=False):
    """Return value as float (int if `integer`) or raise LongtailError('losses.x.y must be >= 0, got -1')."""
    kind = "an integer" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise LongtailError(f"{key} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise LongtailError(f"{key} must be {kind}, got {value!r}")
    if min is not None and value < min:
        raise LongtailError(f"{key} must be >= {min}, got {value:g}")
    if above is not None and value <= above:
        raise LongtailError(f"{key} must be > {above}, got {value:g}")
    if max is not None and value > max:
        raise LongtailError(f"{key} must be <= {max}, got {value:g}")
    if below is not None and value >= below:
        raise LongtailError(f"{key} must be < {below}, got {value:g}")
    return int(value) if integer else float(value)


def closest(key: str, valid, prefix: str = "") -> str:
    """' (did you mean train.epochs?)' for the nearest valid key, or ' (valid: a, b, c)'."""
    valid = sorted(map(str, valid))
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if match:
        return f" (did you mean {prefix}{match[0]}?)"
    return f" (valid: {', '.join(valid) or 'none'})"


def unknown_key(path: str, key: str, valid) -> LongtailError:
    prefix = f"{path}." if path else ""
    return LongtailError(f"unknown key {prefix}{key} in params.yaml{closest(key, valid, prefix)}")


def find_non_finite(node, path: str = ""):
    """The dotted key of the first NaN/inf number anywhere in a params tree, or None."""
    if isinstance(node, float) and not math.isfinite(node):
        return path or "(top level)"
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        found = find_non_finite(v, f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


MERGE_TAG = "tag:yaml.org,2002:merge"


class Loader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 floats (1e-3, 5E+2 and .5 are numbers) that refuses a key given
    twice in one mapping (PyYAML would keep the last one silently)."""

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


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X)
Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _ch in "-+0123456789.":
    Loader.yaml_implicit_resolvers[_ch] = [(tag, rx) for tag, rx in Loader.yaml_implicit_resolvers.get(_ch, [])
                                           if tag != "tag:yaml.org,2002:float"]
Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


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


def yaml_value(text: str):
    """A `-S KEY=VALUE` value as DVC reads it: YAML, with 1e-3 style numbers; unparsable text stays text."""
    try:
        return yaml_load(text)
    except yaml.YAMLError:
        return text
