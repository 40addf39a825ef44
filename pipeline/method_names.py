"""Named methods (pipeline/method_names.yaml): what `longtail report` calls a run, what `longtail
sweep --method NAME` queues, the README's method table, and the method tag of MLflow parent runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checks import yaml_load, yaml_value
from .errors import LongtailError
from .params import SCHEDULES

METHODS_FILE = Path(__file__).resolve().parent / "method_names.yaml"
PHASE_LABELS = {"train.reweighting": "RW", "train.sampler": "RS", "finetune.reweighting": "DRW",
                "finetune.sampler": "DRS", "finetune.strategy": "FT"}


def norm(value):
    """A param value as comparable data: MLflow logs strings ("100", "True", "cb"), YAML gives typed values."""
    if isinstance(value, str):
        loaded = yaml_value(value)  # unparsable text stays text
        if not isinstance(loaded, (bool, int, float, list)) and loaded is not None:
            return value
        value = loaded
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return tuple(norm(v) for v in value)
    return value


def _matches(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p.rstrip(".") + ".") for p in prefixes)




@dataclass
class MethodNames:
    plain: dict
    defaults: dict
    methods: list  # [{name, params, about}]

    @classmethod
    def load(cls, path: Path = METHODS_FILE) -> "MethodNames":
        raw = yaml_load(Path(path).read_text())
        return cls(dict(raw.get("plain") or {}), dict(raw.get("defaults") or {}), list(raw.get("methods") or []))

    @property
    def names(self) -> list[str]:
        return [m["name"] for m in self.methods]

    def full(self, name: str) -> dict:
        """Every param a method fixes (the plain re-balancing values filled in)."""
        for m in self.methods:
            if m["name"] == name:
                return {**self.plain, **m["params"]}
        raise LongtailError(f"unknown method {name!r} (valid: {', '.join(self.names)})")

    def _get(self, params: dict, key: str):
        return params[key] if key in params else self.defaults.get(key)

    def name(self, params: dict) -> str:
        """The method whose params the run has; epoch numbers compare as the run's schedule runs them
        (a run named by params it trained with, not by how they were written)."""
        schedule = SCHEDULES.get(str(self._get(params, "schedule") or "full"), SCHEDULES["full"])

        def same(key, value) -> bool:
            return schedule.resolve(key, norm(self._get(params, key))) == schedule.resolve(key, norm(value))

        for m in self.methods:
            if all(same(k, v) for k, v in {**self.plain, **m["params"]}.items()):
                return m["name"]
        return self.fallback(params)

    def pinned(self, loss) -> list[str]:
        """The loss-plugin params (`losses.<loss>.*`) that named methods of this loss fix, e.g. the MM
        variant and scale: what tells a run that no method names from the methods it resembles."""
        keys = {k for m in self.methods if norm(m["params"].get("loss")) == norm(loss)
                for k in m["params"] if k.startswith("losses.")}
        return sorted(keys)

    def fallback(self, params: dict) -> str:
        """loss+RW:x+RS:y+DRW:z+DRS:w: the loss and every re-balancing choice that is not the plain one."""
        parts = [str(self._get(params, "loss") or "?")]
        for key, short in PHASE_LABELS.items():
            v = self._get(params, key)
            if v is not None and norm(v) != norm(self.plain.get(key)):
                parts.append(f"{short}:{v}")
        return "+".join(parts)

    def markdown(self) -> str:
        """The README's method table."""
        lines = ["| method | params (besides no re-balancing) | what |", "|---|---|---|"]
        for m in self.methods:
            ps = ", ".join(f"`{k}={_yaml_value(v)}`" for k, v in m["params"].items())
            lines.append(f"| {m['name']} | {ps} | {m.get('about', '')} |")
        return "\n".join(lines)


def _yaml_value(v) -> str:
    return "true" if v is True else "false" if v is False else str(v)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested params -> dotted keys, as MLflow logs them (what `MethodNames.name` matches)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
