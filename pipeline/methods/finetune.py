"""Built-in fine-tune strategies (entry-point group `longtail.finetune`; deferred re-balancing:
docs/methods.md §1).

A strategy is `build(**params) -> object` with `run(ctx: FinetuneContext)`; it trains (or
transforms) `ctx.trainer.model` from `ctx.trainer.epoch` up to `ctx.until`. One that trains sets up
its model and optimizer, then calls `ctx.fit(steps)` with an `engine.contract.Steps` (its lr, batches
and per-batch loss); the trainer owns the loop, evaluation, history, best and checkpoints."""


class Continue:
    """Keep training the whole model with the same schedule; the finetune.* re-balancing is on from
    finetune.start_epoch. With finetune.reweighting = cb this is DRW, with finetune.sampler =
    class_balanced DRS (Cao et al., NeurIPS 2019, §3.3)."""

    def run(self, ctx) -> None:
        ctx.fit()


def build_continue() -> Continue:
    return Continue()
