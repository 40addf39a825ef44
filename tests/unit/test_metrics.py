import pytest

from pipeline.engine.metrics import classification_report, shot_groups


def test_shot_groups_boundaries():
    # many > 100, medium 20..100 (inclusive), few < 20
    assert shot_groups([500, 101, 100, 20, 19, 1]) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}


def test_report_by_hand():
    counts = [200, 50, 5]
    y_true = [0, 0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 0, 2, 0]
    r = classification_report(y_true, y_pred, counts)
    assert r["top1"] == pytest.approx(5 / 8) and r["error"] == pytest.approx(3 / 8)
    assert r["per_class"] == pytest.approx([3 / 4, 1 / 2, 1 / 2])
    assert (r["many"], r["medium"], r["few"]) == pytest.approx((0.75, 0.5, 0.5))
    assert r["confusion"] == [[3, 1, 0], [1, 1, 0], [1, 0, 1]]


def test_class_without_test_images_is_none():
    r = classification_report([0, 0], [0, 1], [10, 10])
    assert r["per_class"] == [0.5, None] and r["few"] == 0.5
