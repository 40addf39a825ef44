"""results/cifar10-lt-r100-short/diagnosis/fit.py scores each branch of a BBN model alone: the two branches'
shares (each with the shared bias) must add up to the model's own test-time logits plus that bias once, so
the branch rows split the very prediction the table reports."""

import importlib.util

import torch

from testkit import ROOT

from pipeline.engine.inference import batched
from pipeline.registry import build


def _fit_module():
    spec = importlib.util.spec_from_file_location("fit", ROOT / "results" / "cifar10-lt-r100-short" / "diagnosis"
                                                  / "fit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_two_branch_shares_add_up_to_the_bbn_models_own_logits():
    torch.manual_seed(0)
    model = build("models", "bbn_resnet32", 10, 3, "linear", params={}, param_key="model").eval()
    with torch.no_grad():
        model.classifier.bias.normal_()  # a non-zero bias, so that it is counted exactly once
    x = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    halves = _fit_module().branch_logits(model, x, mean, std)
    assert list(halves) == ["conventional branch only", "re-balancing branch only"]
    with torch.no_grad():
        whole = batched(lambda t: model(t).float(), x, mean, std, 500)
    c, r = halves.values()
    assert torch.allclose(c + r - model.classifier.bias, whole, atol=1e-5)
    assert not torch.allclose(c, whole, atol=1e-3) and not torch.allclose(r, whole, atol=1e-3)
