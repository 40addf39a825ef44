"""Learning-rate schedule of the CIFAR-LT protocol (Cao et al., NeurIPS 2019):
linear warm-up lr * (e+1)/W for 0-based epochs e < W, then lr * factor of the last milestone
reached (defaults: x0.01 from epoch 160, x0.0001 from epoch 180). Set once per epoch."""


def lr_at(epoch: int, base_lr: float, warmup_epochs: int, milestones, factors) -> float:
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / warmup_epochs
    lr = base_lr
    for m, f in zip(milestones, factors):
        if epoch >= m:
            lr = base_lr * f
    return lr
