"""The MM loss against an independent numpy implementation of the formula (docs/methods.md)."""

import math
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longtail_mm.loss import build
from pipeline.plugin_kit import LongtailError, check_loss_plugin

CIFAR10_R100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def np_ce(z, y, w=None):
    z = z - z.max(axis=1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    per = np.array([-lp[i, y[i]] for i in range(len(y))])
    if w is None:
        return per.mean()
    wy = np.array([w[t] for t in y])
    return (wy * per).sum() / wy.sum()


def np_M(counts, variant, max_m):
    if variant == "hmm":
        return [max_m] * len(counts)
    raw = [n ** -0.25 for n in counts]
    return [max_m - 0.5 * r / max(raw) for r in raw]


def np_delta(z, y, counts, variant="hmm", max_m=1.29, gamma=1.528, as_released=False):
    M = np_M(counts, variant, max_m)
    out = []
    for i in range(len(y)):
        p = z[i, y[0] if as_released else y[i]]
        q = max(0.0, max(z[i, j] for j in range(z.shape[1]) if j != y[i]))
        d = p - q
        out.append(math.exp(-d - gamma * M[y[i]]) if d > 0 else math.exp(d - M[y[i]]) if d < 0 else 0.0)
    return np.array(out)


def np_mm(z, y, counts, variant="hmm", s=19.0, max_m=1.29, gamma=1.528, w=None, as_released=False):
    delta = np_delta(z, y, counts, variant, max_m, gamma, as_released)
    z = z.copy()
    for i in range(len(y)):
        z[i, y[i]] -= delta[i]
    return np_ce(s * z, y, w)


def run(loss, z, y, w=None):
    return loss(torch.tensor(z), torch.tensor(y), None if w is None else torch.tensor(w, dtype=torch.float64)).item()


# rows: correct (d = 0.7), wrong (d = -0.4), exact tie (d = 0), all negative (q floored at 0, d = -0.4),
# correct with all negatives < 0 (q = 0, d = 0.5)
Z = np.array([[0.8, 0.1, -0.3], [0.2, 0.6, -0.1], [0.3, 0.3, 0.0], [-0.2, -0.5, -0.4], [-0.2, 0.5, -0.1]])
Y = [0, 0, 1, 2, 1]
W = [0.2, 1.0, 3.5]
COUNTS = [100, 10, 1]


def test_margin_hand_values():
    g, M = 1.528, 1.29
    want = [math.exp(-0.7 - g * M), math.exp(-0.4 - M), 0.0, math.exp(-0.4 - M), math.exp(-0.5 - g * M)]
    got = build(COUNTS).margin(torch.tensor(Z), torch.tensor(Y))
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert got[2].item() == 0.0  # d == 0 exactly
    assert not got.requires_grad


@pytest.mark.parametrize("variant", ["hmm", "hmm_ldam"])
@pytest.mark.parametrize("w", [None, W])
@pytest.mark.parametrize("params", [{}, {"s": 26.0, "max_m": 2.7, "gamma": 1.0}, {"s": 10.0, "max_m": 0.0, "gamma": 0.0}])
def test_against_numpy(variant, w, params):
    loss = build(COUNTS, variant=variant, **params)
    assert run(loss, Z, Y, w) == pytest.approx(np_mm(Z, Y, COUNTS, variant, w=w, **params), rel=1e-12)


@pytest.mark.parametrize("counts,z,y", [
    ([5000, 50], np.array([[0.4, -0.2], [0.1, 0.7], [-0.3, 0.2], [0.5, 0.5]]), [0, 1, 0, 1]),
    ([1, 1, 1000], np.array([[0.4, -0.2, 0.1], [0.1, 0.7, -0.6], [-0.3, 0.2, 0.9], [0.5, 0.5, 0.2]]), [0, 1, 2, 2]),
])
def test_extreme_counts(counts, z, y):
    for variant in ("hmm", "hmm_ldam"):
        for w in (None, [1.0 / n for n in counts]):
            assert run(build(counts, variant=variant), z, y, w) == pytest.approx(np_mm(z, y, counts, variant, w=w), rel=1e-12)


def test_hmm_ldam_per_class_M_cifar10_r100():
    # M_y = 1.29 - 0.5 * (50 / n_y) ** 0.25, computed once in numpy and checked with Decimal square roots
    want = [1.131886117, 1.110303003, 1.085762295, 1.057908850, 1.026170972,
            0.990232349, 0.949324808, 0.902779086, 0.849502972, 0.79]
    assert build(CIFAR10_R100, variant="hmm_ldam").M.tolist() == pytest.approx(want, abs=1e-9)
    assert build(CIFAR10_R100, variant="hmm").M.tolist() == pytest.approx([1.29] * 10)


def released_hmm_loss(z, y, counts, variant="hmm", s=19.0, max_m=1.29, gamma=1.528, w=None):
    """A literal numpy transcription of the authors' released HMMLoss (forward + obj_margins), step by step."""
    C = z.shape[1]
    index_float = np.zeros_like(z)
    index_float[np.arange(len(y)), y] = 1.0  # one-hot of each row's label
    m_list = np.array([n ** -0.25 for n in counts])
    m_list = m_list * (0.5 / m_list.max())
    batch_m = (index_float @ m_list).reshape(-1, 1)  # m_list[y_i]
    M = max_m - batch_m if variant == "hmm_ldam" else max_m
    # obj_margins
    obj_neg_dists = z * (1.0 - index_float)  # each row's own label column set to 0
    min_pos_prob = z[:, y[0]]  # labels[0]: the FIRST sample's label, for every row
    max_neg_prob = obj_neg_dists.max(1)
    batch_m_fg = np.maximum(min_pos_prob - max_neg_prob, 0.0)[:, None]
    batch_fg = np.exp(-batch_m_fg - M * gamma) * (batch_m_fg > 0)
    batch_m_bg = np.maximum(max_neg_prob - min_pos_prob, 0.0)[:, None]
    batch_ng = np.exp(-batch_m_bg - M) * (batch_m_bg > 0)
    batch_hmm = batch_ng + batch_fg  # [B, 1]
    # forward: subtract at the row's own label, CE(weight=w) on s * output
    output = np.where(index_float > 0, z - batch_hmm, z)
    assert output.shape == (len(y), C)
    return np_ce(s * output, y, w)


# mixed labels where reading q at y_0 instead of y_i changes the hardest negative (rows 2 and 4)
ZR = np.array([[0.9, 0.2, -0.1, 0.3], [0.1, 0.8, 0.4, -0.2], [0.7, 0.6, -0.5, 0.1], [-0.3, -0.2, 0.5, -0.4],
               [0.2, 0.9, -0.3, 0.6], [-0.4, -0.1, -0.6, -0.2]])
YR = [0, 1, 1, 2, 3, 3]
COUNTS_R = [300, 60, 12, 3]


@pytest.mark.parametrize("variant", ["hmm", "hmm_ldam"])
@pytest.mark.parametrize("w", [None, [0.3, 0.9, 1.7, 3.1]])
def test_as_released_matches_the_released_code(variant, w):
    got = run(build(COUNTS_R, variant=variant, as_released=True), ZR, YR, w)
    assert got == pytest.approx(released_hmm_loss(ZR, YR, COUNTS_R, variant, w=w), rel=1e-12)
    # and it is not the per-sample loss on this batch
    assert got != pytest.approx(run(build(COUNTS_R, variant=variant), ZR, YR, w), rel=1e-3)


def test_as_released_margin_hand_values():
    # row 2: label 1, y_0 = 0: p = z[2, 0] = 0.7, q = max(0, max_{j != 1} z[2, j]) = 0.7 -> d = 0 -> 0
    # (reading q at y_0 would give q = 0.6, d = 0.1); row 4: label 3, p = z[4, 0] = 0.2,
    # q = max(0.2, 0.9, -0.3) = 0.9 -> d = -0.7 -> exp(-0.7 - M)
    got = build(COUNTS_R, as_released=True).margin(torch.tensor(ZR), torch.tensor(YR))
    assert got[2].item() == 0.0
    assert got[4].item() == pytest.approx(math.exp(-0.7 - 1.29), rel=1e-12)
    # row 5: all logits < 0: q = 0 (floored), p = z[5, 0] = -0.4 -> exp(-0.4 - M)
    assert got[5].item() == pytest.approx(math.exp(-0.4 - 1.29), rel=1e-12)


def test_as_released():
    t = torch.tensor(Z)
    per_sample, released = build(COUNTS), build(COUNTS, as_released=True)
    # labels differ: p and q are read at y_0 = 0 for every row
    assert released.margin(t, torch.tensor(Y)).tolist() == pytest.approx(np_delta(Z, Y, COUNTS, as_released=True), rel=1e-12)
    assert run(released, Z, Y) == pytest.approx(np_mm(Z, Y, COUNTS, as_released=True), rel=1e-12)
    assert run(released, Z, Y) != pytest.approx(run(per_sample, Z, Y), rel=1e-6)
    # all labels equal: identical to the per-sample loss
    for label in range(3):
        same = [label] * len(Y)
        assert torch.equal(released.margin(t, torch.tensor(same)), per_sample.margin(t, torch.tensor(same)))
        assert run(released, Z, same, W) == run(per_sample, Z, same, W)


@pytest.mark.parametrize("params", [{}, {"variant": "hmm_ldam"}, {"as_released": True}])
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck(params, weighted):
    # Delta depends on z but is detached (a constant of the step). Finite differences would move it,
    # so freeze it at its value for this z: gradcheck then checks the CE path around the margin.
    g = torch.Generator().manual_seed(0)
    z = (torch.rand(6, 4, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    y = torch.randint(4, (6,), generator=g)
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    loss = build([400, 90, 12, 2], **params)
    frozen = loss.margin(z, y)
    assert (frozen > 0).all()
    loss.margin = lambda logits, target: frozen
    assert torch.autograd.gradcheck(lambda z: loss(z, y, w), (z,))


@pytest.mark.parametrize("variant", ["hmm", "hmm_ldam"])
@pytest.mark.parametrize("w", [None, W])
def test_margin_is_detached(variant, w):
    y = torch.tensor(Y)
    wt = None if w is None else torch.tensor(w, dtype=torch.float64)
    z = torch.tensor(Z, requires_grad=True)
    build(COUNTS, variant=variant)(z, y, wt).backward()
    # reference: the margin precomputed in numpy as a constant
    delta = torch.tensor(np_delta(Z, Y, COUNTS, variant))
    z_ref = torch.tensor(Z, requires_grad=True)
    F.cross_entropy(19.0 * (z_ref - delta[:, None] * F.one_hot(y, 3)), y, weight=wt).backward()
    assert torch.allclose(z.grad, z_ref.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("params", [{}, {"variant": "hmm_ldam"}, {"as_released": True}, {"variant": "hmm_ldam", "s": 26}])
def test_contract(params):
    loss = check_loss_plugin(build, params=params)
    assert loss.head == "cosine"
    check_loss_plugin(build, class_counts=CIFAR10_R100, params=params)


@pytest.mark.parametrize("params,message", [
    ({"variant": "ldam"}, "losses.mm.variant must be one of hmm, hmm_ldam, got 'ldam'"),
    ({"s": 0}, "losses.mm.s must be > 0"),
    ({"max_m": -1}, "losses.mm.max_m must be >= 0"),
    ({"gamma": -0.5}, "losses.mm.gamma must be >= 0"),
    ({"gamma": "big"}, "losses.mm.gamma must be a finite number"),
    ({"as_released": "yes"}, "losses.mm.as_released must be true or false"),
])
def test_bad_params(params, message):
    with pytest.raises(LongtailError) as e:
        build(COUNTS, **params)
    assert message in str(e.value)


def test_hmm_ldam_rejects_empty_class():
    with pytest.raises(LongtailError, match="losses.mm needs at least one training image per class"):
        build([10, 0], variant="hmm_ldam")


def test_unknown_param_is_type_error():
    with pytest.raises(TypeError):
        build(COUNTS, margin=1)


def test_entry_point():
    eps = [ep for ep in entry_points(group="longtail.losses") if ep.name == "mm"]
    if not eps:
        pytest.skip("longtail-mm is not pip-installed")
    assert eps[0].value == "longtail_mm.loss:build"
    assert eps[0].load() is build
