"""The loss a training run reports: the mean over fixed batches of the train and val splits (the same batches at
every evaluation, so curves compare), in the memory plan's micro-batches."""

import torch

from config import TrainConfig
from gpt import GPT
from gptlab.data import TokenSplit, batch_rng
from gptlab.objectives import Objective
from gptlab.runtime import Runtime, to_device

EVAL_TRAIN_STREAM, EVAL_VAL_STREAM = 1, 2  # random streams of evaluation batches, apart from training's (0)


@torch.no_grad()
def batch_loss(model: GPT, x: torch.Tensor, y: torch.Tensor, micro_batch: int, rt: Runtime,
               objective: Objective) -> tuple[float, int, int]:
    """A batch's mean loss over its scored targets (those not -1), how many of them the model ranks first, and
    their count, computed in the memory plan's micro-batches: where those are smaller than the batch, the whole
    batch's logits may not fit."""
    loss_sum, correct, scored_count = 0.0, 0, 0
    for xm, ym in zip(x.split(micro_batch), y.split(micro_batch), strict=True):
        xm, ym = to_device(xm, rt.device), to_device(ym, rt.device)
        with rt.autocast():
            logits, loss = objective.loss(model, xm, ym)
        scored = ym != -1
        n = int(scored.sum())
        loss_sum += loss.item() * n if n else 0.0  # a micro-batch with nothing scored has a NaN mean
        correct += int((logits.argmax(-1)[scored] == ym[scored]).sum())
        scored_count += n
    return loss_sum / max(scored_count, 1), correct, scored_count


@torch.no_grad()
def estimate_loss(model: GPT, split: TokenSplit, stream: int, c: TrainConfig, rt: Runtime, objective: Objective,
                  micro_batch: int) -> tuple[float, float]:
    """Mean loss over `eval_iters` batches, and the fraction of predicted tokens the model ranks first;
    the same batches (and masks) at every evaluation, so curves are comparable."""
    model.eval()
    losses, correct, predicted = [], 0, 0
    for i in range(c.eval_iters):
        x, y = objective.batch(split, c.batch_size, c.model.block_size, batch_rng(c.seed, stream, i))
        loss, batch_correct, scored = batch_loss(model, x, y, micro_batch, rt, objective)
        losses.append(loss)
        correct += batch_correct
        predicted += scored
    model.train()
    return sum(losses) / len(losses), correct / max(predicted, 1)


def evaluate(model: GPT, splits: dict[str, TokenSplit], c: TrainConfig, rt: Runtime, objective: Objective,
             micro_batch: int) -> dict[str, float]:
    """Train and val loss, and what the objective reports (val bits per byte, or masked-token accuracy)."""
    train_loss, _ = estimate_loss(model, splits["train"], EVAL_TRAIN_STREAM, c, rt, objective, micro_batch)
    val_loss, val_accuracy = estimate_loss(model, splits["val"], EVAL_VAL_STREAM, c, rt, objective, micro_batch)
    return objective.report(train_loss, val_loss, val_accuracy, splits["val"])
