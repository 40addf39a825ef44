"""`longtail plugins new NAME`: a new loss as its own pip-installable package, ready to edit.

The generated package is a working loss (cross-entropy with label smoothing) that passes the
contract check, so a user starts from something that trains and only changes the formula."""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from .errors import LongtailError

PYPROJECT = '''[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "longtail-{dist}"
version = "0.1.0"
description = "The {name} loss as a longtail plugin."
requires-python = ">=3.10"
dependencies = ["longtail", "torch"]

# the registration: `longtail` finds the loss `{name}` through this entry point
[project.entry-points."longtail.losses"]
{name} = "longtail_{name}.loss:build"

[tool.setuptools.packages.find]
where = ["src"]
'''

LOSS = '''"""The {name} loss (a longtail loss plugin).

Starts as cross-entropy with label smoothing (Szegedy et al., CVPR 2016): the target is
(1 - eps) one_hot(y) + eps / C. Replace the formula in `forward`; cite its source here.
"""

import torch.nn.functional as F
from torch import nn

# plugins import only from the plugin kit (its docstring is the contract: head, forward, hooks)
from pipeline.plugin_kit import LongtailError, weighted_mean


class Loss(nn.Module):
    head = "linear"  # or "cosine": the model then gives cos(feature, w_j) and you apply a scale here

    def __init__(self, class_counts, smoothing):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits, target, class_weight=None):
        per_sample = F.cross_entropy(logits, target, reduction="none", label_smoothing=self.smoothing)
        return weighted_mean(per_sample, target, class_weight)  # sum_i w_y l_i / sum_i w_y with class weights


def build(class_counts, *, smoothing=0.0):
    """Params come from params.yaml `losses.{name}`."""
    if not 0.0 <= smoothing < 1.0:
        raise LongtailError(f"losses.{name}.smoothing must be in [0, 1), got {{smoothing}}")
    return Loss(class_counts, smoothing)
'''

TEST = '''import pytest
import torch

from longtail_{name}.loss import build
from pipeline.plugin_kit import LongtailError, check_loss_plugin


def test_contract():
    check_loss_plugin(build)
    check_loss_plugin(build, params={{"smoothing": 0.1}})


def test_value_by_hand():
    # two classes, logits (0, 0): CE = log 2 whatever the smoothing
    loss = build([10, 1], smoothing=0.2)
    assert loss(torch.zeros(1, 2), torch.tensor([0])).item() == pytest.approx(0.693147, abs=1e-5)


def test_bad_param():
    with pytest.raises(LongtailError, match="losses.{name}.smoothing"):
        build([10, 1], smoothing=1.5)
'''

README = '''# longtail-{dist}

The `{name}` loss as a [longtail] plugin. Install it next to longtail and select it:

    pip install -e {path}
    longtail plugins list losses          # shows {name}
    dvc exp run -S loss={name} -S losses.{name}.smoothing=0.1

Edit `src/longtail_{name}/loss.py`; `pytest {path}` checks the plugin contract.
'''


def new_loss(name: str, dest: Path, params_file: Path | None = None) -> Path:
    """Write plugins/longtail-NAME (or `dest`); add `losses.NAME` to params.yaml if given."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise LongtailError(f"plugin name {name!r} must be a lowercase Python identifier, not a keyword (e.g. my_loss)")
    if params_file is not None and params_file.exists():  # checked before anything is written
        _params_mapping(params_file, "losses")
    from . import registry

    if name in registry.names("losses"):  # the exact path losses.NAME (samplers.sqrt is another plugin)
        raise LongtailError(f"a loss named {name!r} is already installed (see `longtail plugins list losses`)")
    if dest.exists():
        raise LongtailError(f"{dest} already exists; choose another name or --dest")
    dist = name.replace("_", "-")
    fields = dict(name=name, dist=dist, path=dest)
    files = {
        "pyproject.toml": PYPROJECT,
        f"src/longtail_{name}/__init__.py": '"""The {name} loss plugin for longtail."""\n',
        f"src/longtail_{name}/loss.py": LOSS,
        f"tests/test_{name}.py": TEST,
        "README.md": README,
    }
    for rel, template in files.items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**fields))
    if params_file is not None and params_file.exists():
        add_section(params_file, "losses", name, {"smoothing": 0.0}, comment=str(dest))
    return dest


def _params_mapping(params_file: Path, section: str) -> dict:
    """params.yaml as a mapping whose `section` is a mapping, or one line saying why it is not one."""
    from .checks import yaml_file

    if not params_file.is_file():
        raise LongtailError(f"params file {params_file} is not a file")
    raw = yaml_file(params_file, f"params file {params_file}") or {}
    if not isinstance(raw, dict):
        raise LongtailError(f"params file {params_file} must be a mapping of keys, got a {type(raw).__name__}")
    if not isinstance(raw.get(section) or {}, dict):
        raise LongtailError(f"{params_file}: {section} must be a mapping of plugin name -> parameters")
    return raw


def add_section(params_file: Path, section: str, name: str, values: dict, comment: str = "") -> bool:
    """Write `section.name: {values}` into params.yaml (keeping its comments) unless that exact key
    exists; returns whether it wrote. The check is on the parsed path, not on the text, so a key of
    the same name in another section (samplers.sqrt, finetunes.crt) does not count."""
    import yaml

    raw = _params_mapping(params_file, section)  # first: it names a file that is not UTF-8 text in one line
    text = params_file.read_text(encoding="utf-8")
    if name in (raw.get(section) or {}):
        return False
    flow = yaml.safe_dump(values, default_flow_style=True, width=10**6).strip() if values else "{}"
    line = f"  {name}: {flow}" + (f"   # {comment}" if comment else "") + "\n"
    text, n = re.subn(rf"^{section}:.*\n", lambda m: m.group(0) + line, text, count=1, flags=re.M)
    if not n:
        text = text.rstrip("\n") + f"\n\n{section}:\n{line}"
    from .io import atomic_path

    with atomic_path(params_file) as tmp:  # a kill mid-write must not leave the user's params.yaml half-written
        tmp.write_text(text, encoding="utf-8")
    return True


def add_plugin(name: str, params_file: Path) -> tuple[str, dict]:
    """`longtail plugins add NAME`: the plugin's params section from its build signature's defaults."""
    from . import registry
    from .params import PLUGIN_SECTIONS

    groups = [(section, group) for section, group in PLUGIN_SECTIONS.items() if name in registry.names(group)]
    if not groups:
        valid = sorted({n for g in PLUGIN_SECTIONS.values() for n in registry.names(g)})
        raise LongtailError(f"no installed plugin named {name!r} takes params (valid: {', '.join(valid)})")
    if not params_file.exists():
        raise LongtailError(f"params file {params_file} not found")
    section, group = groups[0]
    values = registry.defaults(group, name)
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()
              if v is None or isinstance(v, (bool, int, float, str, list, tuple))}
    if not add_section(params_file, section, name, values):
        raise LongtailError(f"{params_file} already has {section}.{name}")
    return f"{section}.{name}", values
