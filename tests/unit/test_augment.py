import pytest
import torch
import torchvision.transforms.functional as TF

from pipeline.data.augment import augment, crop_flip, normalize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _reference(x, oy, ox, flips, pad):
    """torchvision on each image alone: pad with zeros, crop, maybe mirror."""
    out = []
    for img, y, xx, f in zip(x, oy.tolist(), ox.tolist(), flips.tolist()):
        img = TF.crop(TF.pad(img, [pad]), y, xx, x.shape[2], x.shape[3])
        out.append(TF.hflip(img) if f else img)
    return torch.stack(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pad,shape", [(4, (64, 3, 32, 32)), (2, (16, 1, 8, 6)), (0, (8, 3, 5, 5))])
def test_crop_flip_matches_torchvision(device, pad, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    b = shape[0]
    oy, ox = torch.randint(0, 2 * pad + 1, (b,), generator=g), torch.randint(0, 2 * pad + 1, (b,), generator=g)
    oy[:2], ox[:2] = 0, 2 * pad  # the extremes
    flips = torch.rand(b, generator=g) < 0.5
    got = crop_flip(x.to(device), oy.to(device), ox.to(device), flips.to(device), pad)
    assert got.dtype == torch.uint8 and got.device.type == device
    assert torch.equal(got.cpu(), _reference(x, oy, ox, flips, pad))


def _coordinate_images(b, size=32):
    """Channel 0 holds row + 1, channel 1 column + 1, so a crop reveals its offsets and flip."""
    r = torch.arange(1, size + 1, dtype=torch.uint8)
    img = torch.stack([r.view(-1, 1).expand(size, size), r.view(1, -1).expand(size, size)])
    return img.expand(b, 2, size, size).contiguous()


def _decode(out, pad, size=32):
    c = size // 2
    oy = out[:, 0, c, c].long() - 1 - c + pad
    flipped = out[:, 1, c, c + 1] < out[:, 1, c, c]
    ox = torch.where(flipped, out[:, 1, c, c].long() - 1 - (size - 1 - c) + pad, out[:, 1, c, c].long() - 1 - c + pad)
    return oy, ox, flipped


@pytest.mark.parametrize("device", DEVICES)
def test_random_offsets_uniform_and_flips_half(device):
    n, pad = 20000, 4
    g = torch.Generator(device=device).manual_seed(1)
    out = augment(_coordinate_images(n).to(device), pad, True, g).cpu()
    oy, ox, flipped = _decode(out, pad)
    k = 1000  # the decoding is right
    assert torch.equal(out[:k], _reference(_coordinate_images(k), oy[:k], ox[:k], flipped[:k], pad))
    for o in (oy, ox):
        counts = torch.bincount(o, minlength=2 * pad + 1).double()
        assert len(counts) == 2 * pad + 1  # offsets stay in 0..2*pad
        expected = n / (2 * pad + 1)
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 45.6  # chi-square, 8 d.o.f., p = 1e-6
    assert abs(flipped.double().mean().item() - 0.5) < 5 * (0.25 / n) ** 0.5
    assert not torch.equal(oy, ox)  # independent draws


def test_no_flip_and_identity():
    g = torch.Generator().manual_seed(0)
    x = _coordinate_images(500)
    _, _, flipped = _decode(augment(x, 4, False, g), 4)
    assert not flipped.any()
    assert torch.equal(augment(x, 0, False, g), x)


def test_augment_is_deterministic_given_the_generator():
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    a = augment(x, 2, True, torch.Generator().manual_seed(5))
    b = augment(x, 2, True, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, augment(x, 2, True, torch.Generator().manual_seed(6)))


def test_normalize():
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # [1, 2, 1, 2]
    got = normalize(x, (0.5, 0.2), (0.25, 0.1))
    want = torch.tensor([[[[-2.0, 2.0]], [[0.0, 2.0]]]])
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(normalize(x[0], (0.5, 0.2), (0.25, 0.1)), want[0], atol=1e-6)
    ref = TF.normalize(x.float() / 255, [0.5, 0.2], [0.25, 0.1])
    assert torch.allclose(got, ref, atol=1e-6)
