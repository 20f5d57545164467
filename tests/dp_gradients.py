"""Run by tests/test_lora_distributed.py on 2 ranks (mlx.launch): the data-parallel LoRA gradient
(each rank's rows of a batch, averaged as mlx-lm's step averages them) and validation loss, and,
on rank 0, the one-process gradient and loss of the whole batch; rank 0 writes the differences
as JSON to argv[3]."""

import json
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten

from mlx_diffusiongemma import lora
from mlx_diffusiongemma.tuner import adapters, datasets, trainer


def main(model_path, data_path, out):
    group = mx.distributed.init()
    a = lora.settings(["--model", model_path, "--train", "--data", data_path])
    model, tokenizer = lora.load_base(model_path)
    diffusion = lora.diffusion_settings(a, model)
    data = datasets.load_splits(data_path, tokenizer, diffusion.canvas_length, 4096, ["train"])
    mx.random.seed(3)
    adapters.prepare(model, "lora", -1, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    for _, m in model.named_modules():  # nonzero B: every LoRA gradient is nonzero
        if hasattr(m, "lora_b"):
            m.lora_b = 0.01 * mx.random.normal(m.lora_b.shape)
    model.train()
    value_and_grad = nn.value_and_grad(model, trainer.make_loss(diffusion))
    batches = trainer.Batches(diffusion, start_step=5)

    def gradient(comm_group):
        batch = next(batches(data["train"], 4, loop=True, comm_group=comm_group))
        (loss, _), grad = value_and_grad(model, *batch)
        return loss, grad

    loss, grad = gradient(group)
    grad = average_gradients(grad)
    loss = mx.distributed.all_sum(loss, stream=mx.cpu) / group.size()
    mx.eval(loss, grad)
    evaluate = dict(loss=trainer.make_loss(diffusion), iterate_batches=trainer.Batches(diffusion))
    val = trainer.evaluate(model, data["train"][:16], 4, -1, **evaluate)
    if group.rank() != 0:
        return
    want_loss, want = gradient(None)
    # mlx-lm's evaluate on one process: batch losses weighted by their token counts
    total = weight = 0.0
    for batch in trainer.Batches(diffusion)(data["train"][:16], 4):
        batch_loss, batch_weight = trainer.make_loss(diffusion)(model, *batch)
        total += batch_loss.item() * batch_weight.item()
        weight += batch_weight.item()
    want, grad = dict(tree_flatten(want)), dict(tree_flatten(grad))
    result = dict(
        ranks=group.size(),
        names=len(want),
        same_names=sorted(want) == sorted(grad),
        zero=[k for k, g in want.items() if float(mx.abs(g).max()) == 0],
        grad_diff=max(float(mx.abs(grad[k] - want[k]).max()) for k in want),
        grad_scale=max(float(mx.abs(g).max()) for g in want.values()),
        loss=loss.item(),
        want_loss=want_loss.item(),
        val=val,
        want_val=total / weight,
    )
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
