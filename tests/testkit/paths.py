"""Where the project is: the one place the tests compute the repository root."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # tests/testkit/paths.py -> the repository root
