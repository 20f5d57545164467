"""Training on mlx-lm's `train`: DiffusionGemma's loss and batches plugged into its loop.

mlx-lm's loop compiles the step, accumulates gradients, averages them across `mx.distributed`
ranks, evaluates and reports. What it is given here: `loss` (the diffusion objective, returning
mlx-lm's (loss, weight) pair), and `iterate_batches`, which draws each batch's noise from the seed
(so a run is reproducible and a resumed run continues the same stream; on several ranks each
takes its rows of the batch and its noise, so the ranks together compute one process's step)
and, between steps, writes the numbered checkpoints. The checkpoints are written here, atomically,
with the optimizer state beside them, instead of by mlx-lm's loop (whose saves are plain writes);
its own saves are pointed at a scratch file. On several ranks rank 0 alone writes.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs, evaluate
from mlx_lm.tuner.trainer import train as mlx_lm_train

from .checkpoint import grad_checkpoint
from .losses import Batch, batch_loss, canvas_count, pack

PAD_TO = 32  # batch lengths rounded up to this: few distinct shapes for the compiled step


@dataclass
class DiffusionArgs:
    canvas_length: int
    fill_token: int
    vocab_size: int
    self_conditioning_prob: float = 0.5
    encoder_loss_weight: float = 1.0
    t_min: float = 1e-4  # t uniform in [t_min, 1 - t_min]
    seed: int = 0


def draw_noise(rng: np.random.Generator, examples, args: DiffusionArgs):
    """Per example: a canvas of its response, t, the replaced positions and their tokens, and
    the self-conditioning coin."""
    B, C = len(examples), args.canvas_length
    counts = np.array([canvas_count(len(r), C) for _, r in examples])
    canvas_index = (rng.random(B) * counts).astype(np.int32)
    t = rng.uniform(args.t_min, 1 - args.t_min, size=(B, 1))
    replace = rng.random((B, C)) < t
    random_tokens = rng.integers(0, args.vocab_size, (B, C), dtype=np.int32)
    self_condition = rng.random(B) < args.self_conditioning_prob
    return canvas_index, replace, random_tokens, self_condition


def make_batch(examples, noise, args: DiffusionArgs) -> Batch:
    tokens, prompt_len, seq_len = pack(
        [p for p, _ in examples],
        [r for _, r in examples],
        args.canvas_length,
        args.fill_token,
        PAD_TO,
    )
    ci, replace, rand, sc = noise
    return Batch(*(mx.array(a) for a in (tokens, prompt_len, seq_len, ci, replace, rand, sc)))


def make_loss(args: DiffusionArgs, parts: Optional[dict] = None):
    """mlx-lm's loss signature: (model, *batch) -> (loss, weight). The weight is the batch's
    token count, or what `Batches` passes after the Batch fields: the whole batch's count over
    the ranks, so that mlx-lm's evaluate (sum of loss x weight over ranks and batches, over the
    sum of weights) gives one process's figure. `parts`, when given, is a dict that is part of
    the compiled step's state (the optimizer's): the step's diffusion and AR losses are written
    there, so the report can show them without another forward."""

    def loss(model, *batch):
        fields = Batch(*batch[: len(Batch._fields)])
        total, diffusion, ar = batch_loss(model, fields, args.encoder_loss_weight)
        if parts is not None:
            parts["loss_parts"] = mx.stack([diffusion, ar])
        weight = batch[len(Batch._fields)] if len(batch) > len(Batch._fields) else None
        return total, fields.seq_len.sum() if weight is None else weight

    return loss


def rows_of_rank(batch: Batch, group) -> tuple:
    """This rank's rows of a whole batch (the batch split in `group.size()` equal runs of rows,
    padding and noise unchanged), and the weight `make_loss` returns for them."""
    n = 1 if group is None else group.size()
    tokens = batch.seq_len.sum()
    if n == 1:
        return (*batch, tokens)
    B = batch.tokens.shape[0]
    if B % n:
        raise ValueError(f"a batch of {B} examples does not split evenly over {n} ranks")
    lo = group.rank() * (B // n)
    return (*(x[lo : lo + B // n] for x in batch), tokens.astype(mx.float32) / n)


class Batches:
    """`iterate_batches` for mlx-lm's train and evaluate. Examples are grouped by length (as
    mlx-lm does) and the groups shuffled each epoch; batch i of a run always gets the same
    examples and noise for a seed. Validation batches get fixed noise, so evaluations compare.
    With a `comm_group` of several ranks every rank draws the whole batch and its noise, and
    keeps its rows. In the training loop, `on_step(i)` runs once step i is done (before batch
    i + 1); `heartbeat()`, when set, each time a batch is asked for after the first."""

    def __init__(self, args: DiffusionArgs, start_step: int = 0, on_step=None, heartbeat=None):
        self.args = args
        self.start_step = start_step
        self.on_step = on_step
        self.heartbeat = heartbeat

    def __call__(
        self, dataset, batch_size, max_seq_length=None, loop=False, seed=None, comm_group=None
    ):
        for i, batch in enumerate(self.whole(dataset, batch_size, loop)):
            if i and self.heartbeat is not None:
                self.heartbeat()
            yield rows_of_rank(batch, comm_group)

    def whole(self, dataset, batch_size, loop):
        if len(dataset) < batch_size:
            raise ValueError(
                f"the split has {len(dataset)} examples, fewer than --batch-size {batch_size}"
            )
        order = sorted(range(len(dataset)), key=lambda i: sum(map(len, dataset[i])))
        groups = [
            order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)
        ]
        if not loop:
            for i, g in enumerate(groups):
                rng = np.random.default_rng((self.args.seed, 1, i))
                examples = [dataset[j] for j in g]
                yield make_batch(examples, draw_noise(rng, examples, self.args), self.args)
            return
        step = self.start_step
        while True:
            epoch, k = divmod(step, len(groups))
            perm = np.random.default_rng((self.args.seed, 0, epoch)).permutation(len(groups))
            examples = [dataset[j] for j in groups[perm[k]]]
            rng = np.random.default_rng((self.args.seed, 2, step))
            batch = make_batch(examples, draw_noise(rng, examples, self.args), self.args)
            if step > self.start_step and self.on_step is not None:
                self.on_step(step)
            step += 1
            yield batch


def atomic_save(path: Path, arrays: dict, metadata: Optional[dict] = None):
    """Writes to a temporary name in the same folder, then renames: a reader never sees a
    half-written file under `path`."""
    tmp = path.with_name(f".{path.name}.partial.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
    os.replace(tmp, path)


def optimizer_file(adapter_file: Path) -> Path:
    """Where the optimizer state of an adapter file is kept."""
    return adapter_file.with_name(adapter_file.name.replace("adapters", "optimizer"))


class Checkpoints:
    """adapters.safetensors (latest) and NNNNNNN_adapters.safetensors, each with its
    optimizer state (NNNNNNN_optimizer.safetensors) for resuming. Written by rank 0 alone
    (`write`); every rank holds the same weights."""

    def __init__(self, model, optimizer, adapter_path: Path, every: int, write: bool = True):
        self.model, self.optimizer = model, optimizer
        self.path, self.every = adapter_path, every
        self.write = write

    def save(self, step: int, numbered: bool = True):
        weights = dict(tree_flatten(self.model.trainable_parameters()))
        state = {k: v for k, v in tree_flatten(self.optimizer.state) if k != "loss_parts"}
        meta = {"iteration": str(step)}
        names = ["adapters.safetensors"] + (
            [f"{step:07d}_adapters.safetensors"] if numbered else []
        )
        for name in names if self.write else ():
            atomic_save(self.path / name, weights, meta)
            atomic_save(optimizer_file(self.path / name), state, meta)
        return self.path / names[-1]

    def on_step(self, step: int):
        if self.every and step % self.every == 0:
            print(f"Iter {step}: saved {self.save(step).name}", flush=True)


def resume(model, optimizer, adapter_file: str) -> int:
    """Loads adapter (or fully trained) weights; with their optimizer state beside them, the
    optimizer too, and returns the iteration they were saved at (else 0)."""
    f = Path(adapter_file)
    if not f.is_file():
        raise FileNotFoundError(f"--resume-adapter-file {f}: no such file")
    weights = mx.load(str(f))
    expected = dict(tree_flatten(model.trainable_parameters()))
    bad = [k for k, v in weights.items() if k not in expected or v.shape != expected[k].shape]
    if bad:
        raise ValueError(f"{f} does not fit this model and fine-tune type (e.g. {bad[0]})")
    model.load_weights(list(weights.items()), strict=False)
    opt = optimizer_file(f)
    if not opt.is_file():
        return 0
    state, meta = mx.load(str(opt), return_metadata=True)
    optimizer.state = tree_unflatten(list(state.items()))
    return int(meta.get("iteration", 0))


class Report(TrainingCallback):
    """One line per report: total, diffusion and AR loss, learning rate, it/s, tokens/s, peak
    memory; one per validation. On several ranks every rank reports (the diffusion and AR
    losses are averaged over the ranks there), and only rank 0's lines are seen: the other
    ranks' stdout is closed (data_parallel.connect) and `log` is None on them."""

    def __init__(self, parts: dict, start_step: int, log=None, group=None):
        self.parts, self.start = parts, start_step
        self.sums = np.zeros(2)
        self.count = 0
        self.done = start_step
        self.log = log
        self.group = group

    def collect(self, step: int):
        """Adds the diffusion/AR losses of step `step` (once)."""
        if step > self.done and "loss_parts" in self.parts:
            self.sums += np.array(self.parts["loss_parts"].tolist())
            self.count += 1
            self.done = step

    def _emit(self, record: dict, line: str):
        print(line, flush=True)
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(json.dumps(record) + "\n")

    def on_train_loss_report(self, info):
        step = self.start + info["iteration"]
        self.collect(step)
        sums = self.sums
        if self.group is not None and self.group.size() > 1:
            local = mx.array(sums, dtype=mx.float32)
            total = mx.distributed.all_sum(local, group=self.group, stream=mx.cpu)
            sums = np.array(total).astype(np.float64) / self.group.size()
        diffusion, ar = sums / max(self.count, 1)
        it_s = info["iterations_per_second"]
        tok_s = info["tokens_per_second"]
        record = dict(
            iteration=step,
            loss=info["train_loss"],
            diffusion_loss=diffusion,
            ar_loss=ar,
            learning_rate=info["learning_rate"],
            it_per_s=it_s,
            tokens_per_s=tok_s,
            peak_memory_gb=info["peak_memory"],
        )
        self._emit(
            record,
            (
                f"Iter {step}: train loss {info['train_loss']:.4f} (diffusion {diffusion:.4f}, "
                f"AR {ar:.4f}), lr {info['learning_rate']:.3e}, {it_s:.3f} it/s, "
                f"{tok_s:.1f} tokens/s, peak mem {info['peak_memory']:.3f} GB"
            ),
        )
        self.sums[:] = 0
        self.count = 0

    def on_val_loss_report(self, info):
        step = self.start + info["iteration"]
        self._emit(
            dict(iteration=step, val_loss=info["val_loss"], val_time=info["val_time"]),
            f"Iter {step}: val loss {info['val_loss']:.4f} ({info['val_time']:.1f} s)",
        )


def train(
    model,
    optimizer,
    train_set,
    valid_set,
    train_args: TrainingArgs,
    diffusion: DiffusionArgs,
    adapter_path: Path,
    start_step: int = 0,
    log=None,
    heartbeat=None,
):
    """Runs mlx-lm's loop from `start_step` to `train_args.iters` (the run's total), on every
    rank of `mx.distributed` (one process: a group of one); `heartbeat()` after each step and
    each validation batch but the first of each loop."""
    group = mx.distributed.init()
    lead = group.rank() == 0
    parts = optimizer.state
    checkpoints = Checkpoints(model, optimizer, adapter_path, train_args.steps_per_save, lead)
    batches = Batches(diffusion, start_step, on_step=None, heartbeat=heartbeat)
    report = Report(parts, start_step, log if lead else None, group)

    def on_step(step):
        report.collect(step)
        checkpoints.on_step(step)

    batches.on_step = on_step
    remaining = train_args.iters - start_step
    if remaining <= 0:
        raise ValueError(
            f"the run is already at iteration {start_step} of --iters {train_args.iters}"
        )
    scratch = adapter_path / ".mlx_lm_final.safetensors"
    args = TrainingArgs(
        **{
            **train_args.__dict__,
            "iters": remaining,
            "steps_per_save": remaining + 1,
            "adapter_file": str(scratch),
            "grad_checkpoint": False,  # ours, ordered (tuner/checkpoint.py), and undone after
        }
    )
    parts["loss_parts"] = mx.zeros((2,))
    undo = grad_checkpoint(model.layers[0]) if train_args.grad_checkpoint else lambda: None
    try:
        mlx_lm_train(
            model,
            optimizer,
            train_set,
            valid_set,
            args=args,
            loss=make_loss(diffusion, parts),
            iterate_batches=batches,
            training_callback=report,
        )
    finally:
        undo()
    if lead:
        scratch.unlink(missing_ok=True)
    last = train_args.iters
    report.collect(last)
    return checkpoints.save(last, numbered=last % train_args.steps_per_save == 0)


def evaluate_loss(
    model, dataset, batch_size: int, num_batches: int, diffusion: DiffusionArgs, heartbeat=None
):
    """The mean loss over `num_batches` batches (-1: all) with fixed noise, by mlx-lm's evaluate
    (on several ranks, each batch split over them)."""
    return evaluate(
        model,
        dataset,
        batch_size,
        num_batches,
        loss=make_loss(diffusion),
        iterate_batches=Batches(diffusion, heartbeat=heartbeat),
    )
