"""The offline plots page (dvc_plots_template.html) draws what the PNG beside it shows: the confusion
matrix with rows = actual, columns = predicted, square, and plain tick labels. Runs the page's script
in node when node is installed."""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from testkit import ROOT


def test_dvc_confusion_plot_has_the_pngs_orientation():
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]["plots"]
    conf = next(p["plots/confusion.csv"] for p in plots if "plots/confusion.csv" in p)
    assert (conf["x"], conf["y"]) == ("predicted", "actual")  # figures.confusion: x predicted, y actual


def _render(spec: dict) -> str:
    script = re.search(r"<script[^>]*>(.*?)</script>", (ROOT / "dvc_plots_template.html").read_text(), re.S).group(1)
    js = ("var el = {innerHTML: ''}; var window = {}; var document = {querySelector: function () { return el; }};\n"
          + script + f"\nwindow.vegaEmbed('#p', {json.dumps(spec)}); console.log(el.innerHTML);")
    return subprocess.run(["node", "-e", js], capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_offline_confusion_matrix_is_square_with_rows_actual():
    pairs = [("0", "0"), ("0", "1"), ("0", "1"), ("1", "1"), ("2", "0")]  # class 2 is never predicted
    spec = {"title": "confusion", "data": {"values": [{"actual": a, "predicted": p, "rev": "ws"} for a, p in pairs]},
            "encoding": {"x": {"field": "predicted", "type": "nominal"}, "y": {"field": "actual", "type": "nominal"}}}
    html = _render(spec)
    rows = re.findall(r"<tr>(.*?)</tr>", html)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows]
    assert cells[0] == ["", "<b>0</b>", "<b>1</b>", "<b>2</b>"]  # every class is a column
    assert cells[1] == ["<b>0</b>", "1", "2", ""]  # actual 0: predicted 0 once, 1 twice
    assert cells[3] == ["<b>2</b>", "1", "", ""]
    assert "rows actual, columns predicted" in html


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_offline_line_plot_ticks_read_as_numbers():
    spec = {"title": "acc", "data": {"values": [{"epoch": e, "test_acc": 0.5 + e / 100, "rev": "ws"}
                                                for e in range(12)]},
            "encoding": {"x": {"field": "epoch", "type": "quantitative"},
                         "y": {"field": "test_acc", "type": "quantitative"}}}
    texts = re.findall(r"<text[^>]*>(.*?)</text>", _render(spec))
    assert "0" in texts and "11" in texts and "0.5" in texts and "0.61" in texts
    assert "0.00" not in texts and "11.0" not in texts
