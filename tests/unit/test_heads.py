"""Classifier heads: the cosine head starts as the authors' NormedLinear (unit-norm class vectors)."""

import torch

from pipeline.models.heads import CosineLinear, make_head


def test_cosine_head_rows_start_at_unit_norm():
    torch.manual_seed(0)
    head = make_head("cosine", 64, 10)
    assert isinstance(head, CosineLinear)
    norms = head.weight.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones(10), atol=1e-5), norms
    # the direction is the uniform(-1, 1) draw's, as in NormedLinear: uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
    torch.manual_seed(0)
    raw = torch.empty(10, 64).uniform_(-1, 1)
    assert torch.allclose(head.weight.detach(), raw / raw.norm(dim=1, keepdim=True), atol=1e-6)
    # the logits are still cosines
    x = torch.randn(5, 64)
    z = head(x)
    assert z.abs().max() <= 1 + 1e-6
    assert torch.allclose(z, torch.nn.functional.cosine_similarity(x[:, None], raw[None], dim=2), atol=1e-5)
