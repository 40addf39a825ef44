"""Contract checks that plugin authors can run in their own tests.

    from pipeline.testing import check_loss_plugin
    from my_plugin.loss import build
    def test_contract():
        check_loss_plugin(build, params={"s": 30})

Only torch is needed, and it is imported when a check runs.
"""


def check_loss_plugin(build, class_counts=None, params=None):
    """Check that ``build`` honours the longtail loss plugin contract; return the built module.

    The contract is written down in pipeline.plugin_kit: build(class_counts, **params) -> Module,
    ``head``, the batch-mean ``forward(logits, target, class_weight=None)``, the optional
    ``set_epoch`` and ``extra_inputs`` hooks.

    Raises AssertionError naming the first thing that is wrong.
    """
    import torch

    counts = list(class_counts) if class_counts is not None else [500, 120, 30, 5]
    params = dict(params or {})
    name = getattr(build, "__qualname__", repr(build))
    try:
        loss = build(counts, **params)
    except Exception as e:
        raise AssertionError(f"{name}({counts}, **{params}) raised {type(e).__name__}: {e}") from e
    assert isinstance(loss, torch.nn.Module), f"{name} must return a torch.nn.Module, got {type(loss).__name__}"
    from .plugin_kit import EXTRA_INPUTS, LOSS_HEADS  # the contract's own lists

    head = getattr(loss, "head", None)
    assert head in LOSS_HEADS, f"{name}: loss.head must be one of {', '.join(map(repr, LOSS_HEADS))}, got {head!r}"
    extra = tuple(getattr(loss, "extra_inputs", ()) or ())
    assert set(extra) <= set(EXTRA_INPUTS), (
        f"{name}: loss.extra_inputs must name only {', '.join(map(repr, EXTRA_INPUTS))}, got {extra!r}")
    set_epoch = getattr(loss, "set_epoch", None)
    assert set_epoch is None or callable(set_epoch), f"{name}: loss.set_epoch must be a method (epoch, epochs)"

    C, g = len(counts), torch.Generator().manual_seed(0)
    weight = torch.rand(C, generator=g) + 0.1

    D = 6

    def batch(B):
        target = torch.randint(C, (B,), generator=g)
        if extra:  # logits from a features and a weight, as the trainer computes them
            x, W = torch.randn(B, D, generator=g), torch.randn(C, D, generator=g)
            return x @ W.t(), target, {"features": x, "weight": W}
        if head == "cosine":
            return torch.rand(B, C, generator=g) * 2 - 1, target, None
        return torch.randn(B, C, generator=g) * 3, target, None

    def run(logits, target, class_weight, inputs, what):
        leaf = logits.clone().requires_grad_()
        z = leaf.clone()  # not a leaf, like a model's output
        kwargs = {"class_weight": class_weight} | {k: inputs[k] for k in extra}
        state = {k: v.clone() for k, v in loss.state_dict().items()}  # a stateful loss (a step counter)
        try:
            out = loss(z, target, **kwargs)
            loss.load_state_dict(state)  # is compared on the same state
        except Exception as e:
            raise AssertionError(f"{name}: forward ({what}) raised {type(e).__name__}: {e}") from e
        assert isinstance(out, torch.Tensor) and out.dim() == 0, (
            f"{name}: forward ({what}) must return a scalar tensor, got {getattr(out, 'shape', type(out).__name__)}"
        )
        assert torch.isfinite(out), f"{name}: forward ({what}) returned {out.item()}"
        assert torch.equal(z.detach(), logits), f"{name}: forward ({what}) modified the logits in place"
        assert out.requires_grad, f"{name}: loss ({what}) is not differentiable w.r.t. logits (no graph)"
        out.backward()
        assert leaf.grad is not None, f"{name}: loss ({what}) is not differentiable w.r.t. logits (no gradient)"
        assert torch.isfinite(leaf.grad).all(), f"{name}: gradient w.r.t. logits ({what}) is not finite"
        return out.detach(), leaf.grad

    epochs = (0, 9) if set_epoch is not None else (None,)
    for epoch in epochs:
        if epoch is not None:
            try:
                set_epoch(epoch, 10)
            except Exception as e:
                raise AssertionError(f"{name}: set_epoch({epoch}, 10) raised {type(e).__name__}: {e}") from e
        at = "" if epoch is None else f", epoch {epoch}"
        for B in (8, 1):
            logits, target, norms = batch(B)
            plain, grad = run(logits, target, None, norms, f"B={B}{at}")
            if B > 1:
                assert grad.abs().sum() > 0, f"{name}: gradient w.r.t. logits is all zero (B={B}{at})"
            run(logits, target, weight, norms, f"B={B}, class_weight[{C}]{at}")
            ones, _ = run(logits, target, torch.ones(C), norms, f"B={B}, class_weight=ones{at}")
            assert torch.allclose(ones, plain, rtol=1e-5, atol=1e-6), (
                f"{name}: class_weight=ones gives {ones.item()}, no class_weight {plain.item()} (must be the same mean)"
            )
            norms2 = None if norms is None else {"features": norms["features"].repeat(2, 1), "weight": norms["weight"]}
            twice, _ = run(logits.repeat(2, 1), target.repeat(2), None, norms2, f"batch repeated twice{at}")
            assert torch.allclose(twice, plain, rtol=1e-5, atol=1e-6), (
                f"{name}: the same batch twice gives {twice.item()}, once {plain.item()}: return the batch mean, not the sum"
            )
    return loss
