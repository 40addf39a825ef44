"""Built-in losses against independent numpy implementations of the formulas in docs/methods.md §2."""

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


def np_focal_reference(z, y, gamma, w=None):
    """The LDAM-DRW code's convention: CE_w = w_y CE, p = exp(-CE_w), plain mean of (1 - p)^gamma CE_w."""
    lp = np_log_softmax(z)
    out = []
    for i in range(len(y)):
        ce_w = (1.0 if w is None else w[y[i]]) * -lp[i, y[i]]
        out.append((1 - math.exp(-ce_w)) ** gamma * ce_w)
    return float(np.mean(out))


def np_sigmoid_focal(z, y, gamma, w=None):
    """Cui et al.'s CB-Focal written out: every class a binary problem, (1 - q)^gamma BCE, summed over classes,
    times the sample's class weight, divided by the batch size."""
    B, C = z.shape
    total = 0.0
    for i in range(B):
        for j in range(C):
            sig = 1 / (1 + math.exp(-z[i, j]))
            q = sig if j == y[i] else 1 - sig
            total += (1.0 if w is None else w[y[i]]) * (1 - q) ** gamma * -math.log(q)
    return total / B


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
        ref = np_focal_reference(z, y, gamma, w)
        assert value(L.build_focal(counts, gamma=gamma), z, y, w) == pytest.approx(ref, rel=1e-12)
        ref = np_focal(z, y, gamma, w)
        assert value(L.build_focal(counts, gamma=gamma, weighting="normalized"), z, y, w) == pytest.approx(ref, rel=1e-12)
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


def test_focal_class_weight_hand_values():
    # z = [[0, 0], [2, 0]], y = [0, 1], w = [3, 1], gamma = 1.
    # CE_0 = log 2, CE_1 = log(1 + e^2); softmax p_t: 1/2 and 1 / (1 + e^2)
    z, y, w = [[0.0, 0.0], [2.0, 0.0]], [0, 1], [3.0, 1.0]
    ce1, q1 = math.log(1 + math.exp(2)), math.exp(2) / (1 + math.exp(2))  # q1 = 1 - p_t of sample 1
    # reference (default): CE_w,0 = 3 log 2, p_0 = exp(-3 log 2) = 1/8; sample 1 has w = 1; plain mean
    want = ((1 - 1 / 8) * 3 * math.log(2) + q1 * ce1) / 2
    assert value(L.build_focal([1, 1]), z, y, w) == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(1.846452, abs=1e-6)
    # normalized: (3 * (1/2) log 2 + 1 * q1 CE_1) / (3 + 1)
    want = (3 * 0.5 * math.log(2) + q1 * ce1) / 4
    assert value(L.build_focal([1, 1], weighting="normalized"), z, y, w) == pytest.approx(want, rel=1e-12)
    # gamma = 0, reference: plain mean of w_y CE (no normalisation by sum w)
    want = (3 * math.log(2) + ce1) / 2
    assert value(L.build_focal([1, 1], gamma=0), z, y, w) == pytest.approx(want, rel=1e-12)


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
        assert L.build_focal(counts, gamma=0, weighting="normalized")(z, y, cw) == pytest.approx(ce.item(), rel=1e-12)
        assert L.build_ldam(counts, max_m=0, s=1)(z, y, cw) == pytest.approx(ce.item(), rel=1e-12)
        assert L.build_balanced_softmax(counts)(z, y, cw) == pytest.approx(L.build_logit_adjust(counts)(z, y, cw).item(), rel=1e-12)
        assert L.build_logit_adjust(counts, tau=0)(z, y, cw) == pytest.approx(ce.item(), rel=1e-12)


# --------------------------------------------------------------------------- L-Softmax


def lsoftmax_batch(seed=0, B=5, C=4, D=6):
    """features x[B, D], classifier weight W[C, D], logits z = x W^T, labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    return x @ W.t(), torch.randint(C, (B,), generator=g), x, W


def lsoftmax_np(z, y, x, W, m, lam, w=None):
    return np_lsoftmax(z.numpy(), y.tolist(), np.linalg.norm(W.numpy(), axis=1), np.linalg.norm(x.numpy(), axis=1),
                       m, lam, None if w is None else w.tolist())


@pytest.mark.parametrize("m", [2, 3, 4])
def test_lsoftmax_against_numpy(m):
    z, y, x, W = lsoftmax_batch(m)
    cw = torch.tensor([0.3, 1.0, 2.0, 0.7], dtype=torch.float64)
    # base 8, gamma 1, power 1: lambda_t = max(0.5, 8 / (1 + t)) -> 8, 4, 8/3, 2, ..., 0.5 from t = 15
    loss = L.build_lsoftmax([10] * 4, m=m, base=8.0, gamma=1.0, power=1.0, lambda_min=0.5)
    for t, lam in ((0, 8.0), (1, 4.0), (2, 8 / 3), (3, 2.0), (15, 0.5), (40, 0.5)):
        for w in (None, cw):
            loss.iteration.fill_(t)
            got = loss(z, y, class_weight=w, features=x, weight=W).item()
            assert int(loss.iteration) == t + 1  # one training step
            assert got == pytest.approx(lsoftmax_np(z, y, x, W, m, lam, w), rel=1e-10)


def test_lsoftmax_schedule_hand_values():
    # the authors' CIFAR setting: 1000 (1 + 2e-5 t)^-45, floored at lambda_min = 5
    loss = L.build_lsoftmax([1, 1])
    assert (loss.base, loss.gamma, loss.power, loss.lambda_min) == (1000.0, 2e-5, 45.0, 5.0)
    for t, lam in ((0, 1000.0), (1000, 1000 * 1.02 ** -45), (5000, 1000 * 1.1 ** -45), (10**6, 5.0)):
        loss.iteration.fill_(t)
        assert loss.lam == pytest.approx(lam, rel=1e-12)
    assert 1000 * 1.02 ** -45 == pytest.approx(410.2, abs=0.1)  # still far from plain softmax at 1000 steps


def test_lsoftmax_step_counter_advances_only_on_training_steps_and_resumes():
    z, y, x, W = lsoftmax_batch(3)
    loss = L.build_lsoftmax([1] * 4, base=100.0, gamma=0.5, power=1.0, lambda_min=0.0)
    for _ in range(3):
        loss(z, y, features=x, weight=W)
    assert int(loss.iteration) == 3
    with torch.no_grad():
        loss(z, y, features=x, weight=W)
    loss.eval()
    loss(z, y, features=x, weight=W)
    loss.train()
    assert int(loss.iteration) == 3
    resumed = L.build_lsoftmax([1] * 4, base=100.0, gamma=0.5, power=1.0, lambda_min=0.0)
    resumed.load_state_dict(loss.state_dict())  # the trainer's checkpoint holds criterion.state_dict()
    assert int(resumed.iteration) == 3 and resumed.lam == loss.lam == pytest.approx(100 / 2.5)
    assert resumed(z, y, features=x, weight=W).item() == loss(z, y, features=x, weight=W).item()


def test_lsoftmax_zero_feature_is_finite():
    # a pooled ReLU feature that is exactly zero: cos = 0 / (0 + 1e-9) = 0, not 0/0 (the authors' epsilon)
    z, y, x, W = lsoftmax_batch(5)
    x = x.clone()
    x[1] = 0
    x.requires_grad_()
    W = W.clone().requires_grad_()
    loss = L.build_lsoftmax([1] * 4, lambda_min=0.0, base=0.0)
    out = loss(x @ W.t(), y, features=x, weight=W)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all() and torch.isfinite(W.grad).all()
    # the zero row contributes CE of all-zero logits: log C, whatever lambda
    per_row = L.build_lsoftmax([1] * 4, lambda_min=0.0, base=0.0)(x[1:2] @ W.t(), y[1:2], features=x[1:2], weight=W)
    assert per_row.item() == pytest.approx(math.log(4))


def test_lsoftmax_psi_hand_values():
    # theta = 2 pi / 3 with m = 2: k = 1, psi = -cos(4 pi / 3) - 2 = -1.5; lambda = 0 -> f_y = |W||x| psi
    # |W_0| = 2, |x| = 1, |W_1| = 1, z = (2 cos(2 pi / 3), 0) = (-1, 0)
    loss = L.build_lsoftmax([1, 1], m=2, base=0.0, lambda_min=0.0)
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    W = torch.tensor([[2 * math.cos(2 * math.pi / 3), 2 * math.sin(2 * math.pi / 3)], [0.0, 1.0]], dtype=torch.float64)
    got = loss(x @ W.t(), torch.tensor([0]), features=x, weight=W).item()
    assert got == pytest.approx(math.log(1 + math.exp(0.0 - 2 * -1.5)))
    # huge lambda -> plain CE on the original logits (up to the 1e-9 epsilon)
    z, y, x, W = lsoftmax_batch(7)
    big = L.build_lsoftmax([1] * 4, base=1e12, lambda_min=0.0)
    assert big(z, y, features=x, weight=W).item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-9)


def test_lsoftmax_asks_for_extra_inputs():
    loss = L.build_lsoftmax([1, 1])
    assert loss.extra_inputs == ("features", "weight") and loss.head == "linear_nobias"
    with pytest.raises(ValueError, match="features"):
        loss(torch.zeros(2, 2), torch.tensor([0, 1]))


# --------------------------------------------------------------------------- gradients

SIMPLE = {"ce": {}, "focal": {"gamma": 2.0}, "sigmoid_focal": {"gamma": 2.0}, "ldam": {}, "ldam_hinge": {}, "am": {}, "hinge": {}, "ls_svm": {},
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
    _, y, x, W = lsoftmax_batch(11)
    for m in (2, 3, 4):
        loss = L.build_lsoftmax([1] * 4, m=m, base=0.5, lambda_min=0.0, gamma=0.0).eval()  # fixed lambda
        args = (x.clone().requires_grad_(), W.clone().requires_grad_())
        assert torch.autograd.gradcheck(lambda x, W: loss(x @ W.t(), y, features=x, weight=W), args)


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
    assert {n for n, h in heads.items() if h == "linear_nobias"} == {"lsoftmax"}


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
    ("lsoftmax", {"lambda_min": -1}, "losses.lsoftmax.lambda_min must be >= 0, got -1"),
    ("lsoftmax", {"gamma": float("inf")}, "losses.lsoftmax.gamma must be a finite number"),
    ("lsoftmax", {"power": -45}, "losses.lsoftmax.power must be >= 0"),
    ("lsoftmax", {"base": "x"}, "losses.lsoftmax.base"),
    ("logit_adjust", {"tau": -1}, "losses.logit_adjust.tau"),
    ("focal", {"gamma": True}, "losses.focal.gamma"),
    ("focal", {"weighting": "alpha"}, "losses.focal.weighting must be one of reference, normalized, got 'alpha'"),
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


# --------------------------------------------------------------------------- CB-Focal as Cui et al. released it

def test_sigmoid_focal_by_hand():
    """z = (0, ln 3), y = 0, gamma = 1: class 0 (target): q = 1/2, (1 - q) BCE = ln(2)/2; class 1: sigmoid = 3/4,
    q = 1/4, (1 - q) BCE = (3/4) ln 4. Sum: ln 4. With class weights (2, 1) the sample counts twice: 2 ln 4."""
    z = torch.tensor([[0.0, math.log(3)]], dtype=torch.float64)
    y = torch.tensor([0])
    loss = L.build_sigmoid_focal([10, 1], gamma=1.0)
    assert loss(z, y).item() == pytest.approx(math.log(4), rel=1e-12)
    assert loss(z, y, torch.tensor([2.0, 1.0])).item() == pytest.approx(2 * math.log(4), rel=1e-12)
    # gamma = 0 is the per-class sigmoid cross-entropy: ln 2 + ln 4
    assert L.build_sigmoid_focal([10, 1], gamma=0.0)(z, y).item() == pytest.approx(math.log(8), rel=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_sigmoid_focal_against_the_written_out_formula(gamma):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(7, 4, generator=g, dtype=torch.float64) * 4
    y = torch.randint(4, (7,), generator=g)
    w = torch.rand(4, generator=g, dtype=torch.float64) * 3 + 0.05
    loss = L.build_sigmoid_focal([400, 90, 12, 2], gamma=gamma)
    for weights in (None, w):
        ref = np_sigmoid_focal(z.numpy(), y.tolist(), gamma, None if weights is None else weights.tolist())
        assert loss(z, y, weights).item() == pytest.approx(ref, rel=1e-10)
    # far from the boundary the stable modulating factor stays finite, and so does the gradient
    big = torch.tensor([[60.0, -60.0], [-60.0, 60.0]], dtype=torch.float64, requires_grad=True)
    out = L.build_sigmoid_focal([1, 1], gamma=gamma)(big, torch.tensor([0, 0]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(big.grad).all()


def test_sigmoid_focal_starts_every_sigmoid_at_one_over_c():
    """Cui et al.'s model initialises the classifier bias to -log(C - 1) for sigmoid-based losses."""
    clf = torch.nn.Linear(8, 10)
    L.build_sigmoid_focal([5] * 10).init_classifier(clf)
    assert torch.allclose(clf.bias, torch.full((10,), -math.log(9)))
    assert torch.allclose(torch.sigmoid(clf.bias), torch.full((10,), 0.1))
