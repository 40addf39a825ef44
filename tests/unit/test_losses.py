"""Built-in losses against independent numpy implementations of the formulas in methods.md section 2."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import LongtailError
from pipeline.methods import losses as L
from pipeline.testing import check_loss_plugin

CIFAR10_R100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]

# --------------------------------------------------------------------------- numpy references (loops on purpose)


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_mean(per_sample, y, w):
    if w is None:
        return per_sample.mean()
    wy = np.array([w[t] for t in y])
    return (wy * per_sample).sum() / wy.sum()


def np_ce(z, y, w=None):
    lp = np_log_softmax(z)
    return np_mean(np.array([-lp[i, y[i]] for i in range(len(y))]), y, w)


def np_focal(z, y, gamma, w=None):
    p = np.exp(np_log_softmax(z))
    return np_mean(np.array([-((1 - p[i, y[i]]) ** gamma) * math.log(p[i, y[i]]) for i in range(len(y))]), y, w)


def np_ldam_margins(counts, max_m):
    raw = [n ** -0.25 for n in counts]
    return [max_m * r / max(raw) for r in raw]


def np_margin_ce(z, y, delta_per_class, s, w=None):
    z = z.copy()
    for i in range(len(y)):
        z[i, y[i]] -= delta_per_class[y[i]]
    return np_ce(s * z, y, w)


def np_hinge(z, y, delta_per_class, w=None):
    out = []
    for i in range(len(y)):
        neg = max(z[i, j] for j in range(z.shape[1]) if j != y[i])
        out.append(max(0.0, delta_per_class[y[i]] + neg - z[i, y[i]]))
    return np_mean(np.array(out), y, w)


def np_ls_svm(z, y, w=None):
    out = []
    for i in range(len(y)):
        t = np.where(np.arange(z.shape[1]) == y[i], 1.0, -1.0)
        out.append(0.5 * ((z[i] - t) ** 2).sum())
    return np_mean(np.array(out), y, w)


def np_lsoftmax(z, y, w_norm, x_norm, m, lam, w=None):
    z = z.copy()
    for i in range(len(y)):
        a = w_norm[y[i]] * x_norm[i]
        theta = math.acos(z[i, y[i]] / a)
        k = min(int(math.floor(theta * m / math.pi)), m - 1)
        psi = (-1) ** k * math.cos(m * theta) - 2 * k
        z[i, y[i]] = (lam * a * math.cos(theta) + a * psi) / (1 + lam)
    return np_ce(z, y, w)


def np_prior_ce(z, y, counts, tau=1.0, w=None, prior="n"):
    n = np.array(counts, float)
    off = np.log(n) if prior == "n" else tau * np.log(n / n.sum())
    return np_ce(z + off, y, w)


def T(a, dtype=torch.float64):
    return torch.tensor(a, dtype=dtype)


def value(loss, z, y, w=None, **kw):
    return loss(T(z), torch.tensor(y), class_weight=None if w is None else T(w), **kw).item()


# --------------------------------------------------------------------------- hand-made batches

# C = 3 cosine logits: correct with margin, wrong, exact tie (d = 0), all-negative row, correct with q floored
Z3 = np.array([[0.8, 0.1, -0.3], [0.2, 0.6, -0.1], [0.3, 0.3, 0.0], [-0.2, -0.5, -0.4], [-0.2, 0.5, -0.1]])
Y3 = [0, 0, 1, 2, 1]
W3 = [0.2, 1.0, 3.5]
# C = 4 linear logits
Z4 = np.array([[2.0, -1.0, 0.5, 0.0], [-0.5, 1.5, 3.0, 0.2], [0.1, 0.1, -2.0, 1.0], [4.0, -3.0, 1.0, 2.5]])
Y4 = [0, 1, 3, 3]
W4 = [0.1, 0.5, 2.0, 4.0]
BATCHES = [(Z3, Y3, W3, [100, 10, 1]), (Z4, Y4, W4, [1000, 200, 30, 4])]
EXTREME = [(np.array([[0.4, -0.2], [0.1, 0.7], [-0.3, 0.2]]), [0, 1, 0], [5000, 50]),
           (np.array([[0.4, -0.2, 0.1], [0.1, 0.7, -0.6], [-0.3, 0.2, 0.9], [0.5, 0.5, 0.2]]), [0, 1, 2, 2], [1, 1, 1000])]


@pytest.mark.parametrize("z,y,w,counts", BATCHES)
@pytest.mark.parametrize("weighted", [False, True])
def test_against_numpy(z, y, w, counts, weighted):
    w = w if weighted else None
    C = z.shape[1]
    assert value(L.build_ce(counts), z, y, w) == pytest.approx(np_ce(z, y, w), rel=1e-12)
    for gamma in (0, 0.5, 1, 2):
        assert value(L.build_focal(counts, gamma=gamma), z, y, w) == pytest.approx(np_focal(z, y, gamma, w), rel=1e-12)
    for max_m, s in ((0.5, 30), (0.3, 10)):
        ref = np_margin_ce(z, y, np_ldam_margins(counts, max_m), s, w)
        assert value(L.build_ldam(counts, max_m=max_m, s=s), z, y, w) == pytest.approx(ref, rel=1e-12)
        ref = np_hinge(z, y, np_ldam_margins(counts, max_m), w)
        assert value(L.build_ldam_hinge(counts, max_m=max_m), z, y, w) == pytest.approx(ref, rel=1e-12)
    assert value(L.build_am(counts, m=0.35, s=30), z, y, w) == pytest.approx(np_margin_ce(z, y, [0.35] * C, 30, w), rel=1e-12)
    for margin in (1.0, 0.2):
        assert value(L.build_hinge(counts, margin=margin), z, y, w) == pytest.approx(np_hinge(z, y, [margin] * C, w), rel=1e-12)
    assert value(L.build_ls_svm(counts), z, y, w) == pytest.approx(np_ls_svm(z, y, w), rel=1e-12)
    assert value(L.build_balanced_softmax(counts), z, y, w) == pytest.approx(np_prior_ce(z, y, counts, w=w), rel=1e-12)
    for tau in (1.0, 0.5):
        ref = np_prior_ce(z, y, counts, tau, w, prior="pi")
        assert value(L.build_logit_adjust(counts, tau=tau), z, y, w) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("z,y,counts", EXTREME)
def test_extreme_counts(z, y, counts):
    w = [1.0 / n for n in counts]
    for ww in (None, w):
        for max_m in (0.5, 1.0):
            ref = np_margin_ce(z, y, np_ldam_margins(counts, max_m), 30, ww)
            assert value(L.build_ldam(counts, max_m=max_m), z, y, ww) == pytest.approx(ref, rel=1e-12)
            ref = np_hinge(z, y, np_ldam_margins(counts, max_m), ww)
            assert value(L.build_ldam_hinge(counts, max_m=max_m), z, y, ww) == pytest.approx(ref, rel=1e-12)
        assert value(L.build_balanced_softmax(counts), z, y, ww) == pytest.approx(np_prior_ce(z, y, counts, w=ww), rel=1e-12)
        ref = np_prior_ce(z, y, counts, 1.0, ww, prior="pi")
        assert value(L.build_logit_adjust(counts), z, y, ww) == pytest.approx(ref, rel=1e-12)


def test_hand_values():
    # one sample, C = 2, z = [0, 0], y = 0: CE = log 2; focal gamma 1: (1 - 1/2) log 2
    z, y = [[0.0, 0.0]], [0]
    assert value(L.build_ce([1, 1]), z, y) == pytest.approx(math.log(2))
    assert value(L.build_focal([1, 1]), z, y) == pytest.approx(0.5 * math.log(2))
    # hinge: margin 1 + 0 - 0 = 1; LS-SVM: 0.5 * ((0 - 1)^2 + (0 + 1)^2) = 1
    assert value(L.build_hinge([1, 1]), z, y) == pytest.approx(1.0)
    assert value(L.build_ls_svm([1, 1]), z, y) == pytest.approx(1.0)
    # weighted mean: two samples with CE log 2 and log(1 + e^-2), weights 3 and 1
    z, y, w = [[0.0, 0.0], [2.0, 0.0]], [0, 1], [3.0, 1.0]
    want = (3 * math.log(2) + 1 * math.log(1 + math.exp(2))) / 4
    assert value(L.build_ce([1, 1]), z, y, w) == pytest.approx(want)


def test_ldam_margins_cifar10_r100():
    # 0.5 * (50 / n_j) ** 0.25, computed once in numpy and checked with Decimal square roots
    want = [0.158113883, 0.179696997, 0.204237705, 0.232091150, 0.263829028,
            0.299767651, 0.340675192, 0.387220914, 0.440497028, 0.5]
    assert L.build_ldam(CIFAR10_R100).margins.tolist() == pytest.approx(want, abs=1e-9)
    assert L.build_ldam_hinge(CIFAR10_R100).margins.tolist() == pytest.approx(want, abs=1e-9)


def test_identities():
    g = torch.Generator().manual_seed(1)
    z, y, w = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(4, (6,), generator=g), torch.rand(4, dtype=torch.float64) + 0.1
    counts = [300, 100, 20, 3]
    for cw in (None, w):
        ce = F.cross_entropy(z, y, weight=cw)  # PyTorch's own weighted mean
        assert L.build_ce(counts)(z, y, cw) == pytest.approx(ce.item(), rel=1e-12)
        assert L.build_focal(counts, gamma=0)(z, y, cw) == pytest.approx(ce.item(), rel=1e-12)
        assert L.build_ldam(counts, max_m=0, s=1)(z, y, cw) == pytest.approx(ce.item(), rel=1e-12)
        assert L.build_balanced_softmax(counts)(z, y, cw) == pytest.approx(L.build_logit_adjust(counts)(z, y, cw).item(), rel=1e-12)
        assert L.build_logit_adjust(counts, tau=0)(z, y, cw) == pytest.approx(ce.item(), rel=1e-12)


# --------------------------------------------------------------------------- L-Softmax


def lsoftmax_batch(seed=0, B=5, C=4):
    g = torch.Generator().manual_seed(seed)
    w_norm = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    x_norm = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    cos = torch.rand(B, C, generator=g, dtype=torch.float64) * 1.8 - 0.9
    return cos * w_norm * x_norm[:, None], torch.randint(C, (B,), generator=g), w_norm, x_norm


@pytest.mark.parametrize("m", [2, 3, 4])
def test_lsoftmax_against_numpy(m):
    z, y, wn, xn = lsoftmax_batch(m)
    cw = torch.tensor([0.3, 1.0, 2.0, 0.7], dtype=torch.float64)
    loss = L.build_lsoftmax([10] * 4, m=m, lambda_start=5.0, decay=0.5, lambda_min=0.1)
    for epoch, lam in ((0, 5.0), (1, 2.5), (3, 0.625), (10, 0.1)):
        loss.set_epoch(epoch, 20)
        assert loss.lam == pytest.approx(lam)
        for w in (None, cw):
            got = loss(z, y, class_weight=w, norms=(wn, xn)).item()
            ref = np_lsoftmax(z.numpy(), y.tolist(), wn.numpy(), xn.numpy(), m, lam, None if w is None else w.tolist())
            assert got == pytest.approx(ref, rel=1e-10)


def test_lsoftmax_psi_hand_values():
    # theta = 2 pi / 3 with m = 2: k = 1, psi = -cos(4 pi / 3) - 2 = -1.5; lambda = 0 -> f_y = |W||x| psi
    loss = L.build_lsoftmax([1, 1], m=2, lambda_start=0.0)
    z, y = torch.tensor([[2 * math.cos(2 * math.pi / 3), 0.0]], dtype=torch.float64), torch.tensor([0])
    got = loss(z, y, norms=(torch.tensor([2.0, 1.0]), torch.tensor([1.0]))).item()
    assert got == pytest.approx(math.log(1 + math.exp(0.0 - 2 * -1.5)))
    # huge lambda -> plain CE on the original logits
    z, y, wn, xn = lsoftmax_batch(7)
    big = L.build_lsoftmax([1] * 4, lambda_start=1e12)
    assert big(z, y, norms=(wn, xn)).item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-9)


def test_lsoftmax_needs_norms():
    loss = L.build_lsoftmax([1, 1])
    assert loss.needs_norms and loss.head == "linear"
    with pytest.raises(ValueError, match="norms"):
        loss(torch.zeros(2, 2), torch.tensor([0, 1]))


# --------------------------------------------------------------------------- gradients

SIMPLE = {"ce": {}, "focal": {"gamma": 2.0}, "ldam": {}, "ldam_hinge": {}, "am": {}, "hinge": {}, "ls_svm": {},
          "balanced_softmax": {}, "logit_adjust": {"tau": 0.7}}


@pytest.mark.parametrize("name", sorted(SIMPLE))
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck(name, weighted):
    counts = [400, 90, 12, 2]
    loss = getattr(L, f"build_{name}")(counts, **SIMPLE[name])
    g = torch.Generator().manual_seed(3)
    z = torch.rand(6, 4, generator=g, dtype=torch.float64) * 1.8 - 0.9
    if loss.head == "linear":
        z = z * 3
    y = torch.randint(4, (6,), generator=g)
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    assert torch.autograd.gradcheck(lambda z: loss(z, y, w), (z.requires_grad_(),))


def test_gradcheck_lsoftmax():
    z, y, wn, xn = lsoftmax_batch(11)
    for m in (2, 3, 4):
        loss = L.build_lsoftmax([1] * 4, m=m, lambda_start=0.5)
        args = (z.clone().requires_grad_(), wn.clone().requires_grad_(), xn.clone().requires_grad_())
        assert torch.autograd.gradcheck(lambda z, a, b: loss(z, y, norms=(a, b)), args)


# --------------------------------------------------------------------------- contract and params


def test_builtins_pass_contract_check():
    for name, params in SIMPLE.items():
        check_loss_plugin(getattr(L, f"build_{name}"), params=params)
        check_loss_plugin(getattr(L, f"build_{name}"), class_counts=[5000, 50])
    check_loss_plugin(L.build_lsoftmax, params={"m": 3})
    check_loss_plugin(L.build_lsoftmax, class_counts=[1, 1, 1000])


def test_heads():
    heads = {n: getattr(L, f"build_{n}")([10, 1]).head for n in [*SIMPLE, "lsoftmax"]}
    assert {n for n, h in heads.items() if h == "cosine"} == {"ldam", "ldam_hinge", "am"}


class _Sum(torch.nn.Module):
    head = "linear"

    def forward(self, logits, target, class_weight=None):
        return F.cross_entropy(logits, target, reduction="sum")


class _PerSample(_Sum):
    def forward(self, logits, target, class_weight=None):
        return F.cross_entropy(logits, target, reduction="none")


class _NoHead(torch.nn.Module):
    def forward(self, logits, target, class_weight=None):
        return logits.sum() * 0


class _InPlace(_Sum):
    def forward(self, logits, target, class_weight=None):
        return F.cross_entropy(logits.mul_(2), target)


@pytest.mark.parametrize("module,message", [(_Sum, "batch mean"), (_PerSample, "scalar"), (_NoHead, "head"), (_InPlace, "in place")])
def test_contract_check_catches(module, message):
    with pytest.raises(AssertionError, match=message):
        check_loss_plugin(lambda counts: module())


BAD = [
    ("focal", {"gamma": -1}, "losses.focal.gamma must be >= 0, got -1"),
    ("focal", {"gamma": "x"}, "losses.focal.gamma"),
    ("ldam", {"max_m": -0.1}, "losses.ldam.max_m"),
    ("ldam", {"s": 0}, "losses.ldam.s must be > 0"),
    ("ldam_hinge", {"max_m": float("nan")}, "losses.ldam_hinge.max_m"),
    ("am", {"m": -1}, "losses.am.m"),
    ("am", {"s": -30}, "losses.am.s"),
    ("hinge", {"margin": -1}, "losses.hinge.margin"),
    ("lsoftmax", {"m": 5}, "losses.lsoftmax.m must be one of 2, 3, 4"),
    ("lsoftmax", {"m": 2.5}, "losses.lsoftmax.m"),
    ("lsoftmax", {"decay": 1.5}, "losses.lsoftmax.decay must be <= 1"),
    ("lsoftmax", {"decay": 0}, "losses.lsoftmax.decay must be > 0"),
    ("lsoftmax", {"lambda_start": 1, "lambda_min": 2}, "losses.lsoftmax.lambda_min"),
    ("logit_adjust", {"tau": -1}, "losses.logit_adjust.tau"),
    ("focal", {"gamma": True}, "losses.focal.gamma"),
]


@pytest.mark.parametrize("name,params,message", BAD)
def test_bad_params(name, params, message):
    with pytest.raises(LongtailError, match=message.replace(".", r"\.")):
        getattr(L, f"build_{name}")([10, 5, 1], **params)


@pytest.mark.parametrize("name", ["ldam", "ldam_hinge", "balanced_softmax", "logit_adjust"])
def test_empty_class_rejected(name):
    with pytest.raises(LongtailError, match=f"losses.{name} needs at least one training image per class"):
        getattr(L, f"build_{name}")([10, 0, 3])


def test_unknown_param_is_type_error():
    with pytest.raises(TypeError):
        L.build_focal([1, 2], gama=1)
    with pytest.raises(TypeError):
        L.build_ce([1, 2], gamma=1)
