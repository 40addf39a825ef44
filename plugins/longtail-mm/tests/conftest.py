"""Let the tests import longtail_mm from src/ (and the core `pipeline` from this checkout when it is not installed)."""

import importlib.util
import sys
from pathlib import Path

here = Path(__file__).resolve()
sys.path.insert(0, str(here.parents[1] / "src"))
repo = here.parents[3]  # plugins/longtail-mm/tests -> the longtail repo root
if importlib.util.find_spec("pipeline") is None and (repo / "pipeline").is_dir():
    sys.path.insert(0, str(repo))
