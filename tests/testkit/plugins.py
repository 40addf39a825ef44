"""Fake plugin packages for the tests: a distribution's metadata (`NAME-0.1.dist-info` with its entry points)
and its modules, written into a folder that the test then puts on sys.path (monkeypatch.syspath_prepend), as
an installed third-party plugin package would be found."""

from __future__ import annotations


def fake_dist(root, name: str, entry_points: str, modules: dict) -> None:
    """root/NAME-0.1.dist-info declaring `entry_points` (entry_points.txt text), and root/MOD.py for each
    {MOD: source} of `modules` (MOD may be a dotted path written with /, e.g. "pkg/loss")."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    for mod, text in modules.items():
        (root / f"{mod}.py").write_text(text)
