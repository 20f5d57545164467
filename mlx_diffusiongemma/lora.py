"""`python -m mlx_diffusiongemma.lora`: fine-tune DiffusionGemma with its own diffusion objective.

The flags and their meanings are mlx_lm.lora's (its parser is reused), plus
`--self-conditioning-prob` and `--encoder-loss-weight`; `-c config.yaml` as there. Under
`mlx.launch` the ranks train data-parallel: each batch split over them, the run equal to one
process's (docs/DISTRIBUTED_TRAINING.md).
"""

import math
import os
import time
import types
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import yaml
from mlx.utils import tree_flatten
from mlx_lm.lora import CONFIG_DEFAULTS, build_parser, yaml_loader
from mlx_lm.tuner.trainer import TrainingArgs
from mlx_lm.tuner.utils import build_schedule, print_trainable_parameters
from mlx_lm.utils import save_config

from .cli import launched, lost_peer, one_line_errors
from .watchdog import FIRST_STEP_FACTOR, SLOWEST_FACTOR

DEFAULTS = dict(
    CONFIG_DEFAULTS,
    model=None,
    data=None,
    self_conditioning_prob=0.5,
    encoder_loss_weight=1.0,
    fill_token=None,
    max_seq_length=4096,
)
OPTIMIZERS = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "muon": optim.Muon,
    "sgd": optim.SGD,
    "adafactor": optim.Adafactor,
}


def parser():
    p = build_parser()
    p.prog = "mlx_diffusiongemma.lora"
    p.description = "Fine-tune DiffusionGemma (LoRA, DoRA, full; QLoRA on a quantized model)."
    p.add_argument(
        "--self-conditioning-prob",
        type=float,
        help="Probability that pass 2 gets pass 1's logits (default 0.5).",
    )
    p.add_argument(
        "--encoder-loss-weight",
        type=float,
        help="Weight of the encoder's next-token loss (default 1.0).",
    )
    p.add_argument(
        "--fill-token",
        type=int,
        help="Token that fills the last canvas (default: the first EOS id).",
    )
    return p


def settings(argv=None) -> types.SimpleNamespace:
    args = vars(parser().parse_args(argv))
    if args.get("config"):
        with open(args["config"]) as f:
            config = yaml.load(f, yaml_loader) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{args['config']} must hold a YAML mapping")
        unknown = sorted(set(config) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"{args['config']}: unknown option {unknown[0]!r}")
        for k, v in config.items():
            if args.get(k) is None:
                args[k] = v
    for k, v in DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    return types.SimpleNamespace(**args)


def check(a, ranks: int = 1):
    """Every setting in range before anything is loaded; ones that mean nothing here refused."""
    if not a.model:
        raise ValueError("--model is required (a local folder or Hugging Face id)")
    if not (a.train or a.test):
        raise ValueError("pass --train, --test or both")
    if a.mask_prompt:
        raise ValueError(
            "--mask-prompt has no meaning here: the prompt is always what the "
            "encoder reads, and only the response is denoised"
        )
    if a.report_to:
        raise ValueError("--report-to is not supported")
    if a.trust_remote_code:
        raise ValueError(
            "--trust-remote-code is not needed: the model and tokenizer load without it"
        )
    for name in (
        "iters",
        "batch_size",
        "steps_per_report",
        "steps_per_eval",
        "save_every",
        "grad_accumulation_steps",
        "max_seq_length",
    ):
        v = getattr(a, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, not {v!r}")
    for name in ("val_batches", "test_batches"):
        v = getattr(a, name)
        if not isinstance(v, int) or not (v == -1 or v >= 1):
            raise ValueError(f"--{name.replace('_', '-')} must be -1 (all) or positive, not {v!r}")
    if not _finite(a.learning_rate) or a.learning_rate <= 0:
        raise ValueError(f"--learning-rate must be a positive number, not {a.learning_rate!r}")
    if not _finite(a.self_conditioning_prob) or not 0 <= a.self_conditioning_prob <= 1:
        raise ValueError("--self-conditioning-prob must lie in [0, 1]")
    if not _finite(a.encoder_loss_weight) or a.encoder_loss_weight < 0:
        raise ValueError("--encoder-loss-weight must be a finite number >= 0")
    if a.optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    if a.train and not a.data:
        raise ValueError("--data is required: a folder with train.jsonl and valid.jsonl")
    if a.batch_size % ranks:
        raise ValueError(
            f"--batch-size {a.batch_size} does not split over {ranks} ranks: "
            f"pass a multiple of {ranks}"
        )


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_base(path):
    """The model and tokenizer, in the backend's training dtype (the CPU's: float32)."""
    from .backends import for_device
    from .loader import load

    return load(path, dtype=for_device(mx.default_device()).train_dtype)


def fingerprints(a, model, data, start: int) -> dict:
    """What every rank must hold alike, as digests: the flags (paths aside: each machine may
    keep the files elsewhere), the model, the data, the weights to train and the iteration."""
    from .tuner.data_parallel import digest, parameters_digest

    paths = {"model", "data", "adapter_path", "resume_adapter_file", "config"}
    return {
        "flags": digest({k: v for k, v in vars(a).items() if k not in paths}),
        "model weights": parameters_digest(model.parameters()),
        "data": digest(data),
        "trained weights": parameters_digest(model.trainable_parameters()) + digest(start),
    }


def diffusion_settings(a, model):
    from .tuner.trainer import DiffusionArgs

    fill = a.fill_token
    if fill is None:
        fill = next(iter(model.eos_token_ids() or []), None)
    if not isinstance(fill, int) or not 0 <= fill < model.args.vocab_size:
        raise ValueError(
            f"the fill token must be a token id below {model.args.vocab_size}, "
            f"not {fill!r} (set --fill-token)"
        )
    return DiffusionArgs(
        canvas_length=model.args.canvas_length,
        fill_token=fill,
        vocab_size=model.args.vocab_size,
        self_conditioning_prob=a.self_conditioning_prob,
        encoder_loss_weight=a.encoder_loss_weight,
        seed=a.seed,
    )


def run(a):
    from .tuner import data_parallel

    group, watchdog = data_parallel.connect()
    try:
        train_and_test(a, group, watchdog)
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        raise ConnectionError(
            f"rank {group.rank()}: lost the connection to another rank ({e})"
        ) from None
    if watchdog is not None:
        watchdog.stop()


def train_and_test(a, group, watchdog):
    from .tuner import adapters, data_parallel, datasets, trainer

    check(a, group.size())
    lead = group.rank() == 0
    started = time.monotonic()
    mx.random.seed(a.seed)
    print(f"Loading {a.model}", flush=True)
    model, tokenizer = load_base(a.model)
    diffusion = diffusion_settings(a, model)
    splits = ["train", "valid"] if a.train else []
    splits += ["test"] if a.test else []
    data = (
        datasets.load_splits(a.data, tokenizer, diffusion.canvas_length, a.max_seq_length, splits)
        if a.data
        else {}
    )
    adapter_path = Path(a.adapter_path)
    if a.train:
        a.lora_parameters = adapters.prepare(
            model, a.fine_tune_type, a.num_layers, a.lora_parameters or {}
        )
        if not tree_flatten(model.trainable_parameters()):
            raise ValueError("nothing to train: the LoRA keys match no layer")
        print_trainable_parameters(model)  # mlx-lm's (counts packed quantized weights right)
        lr = build_schedule(a.lr_schedule) if a.lr_schedule else a.learning_rate
        opt_config = (a.optimizer_config or {}).get(a.optimizer.lower(), {}) or {}
        opt = OPTIMIZERS[a.optimizer.lower()](learning_rate=lr, **opt_config)
        start = 0
        if a.resume_adapter_file:
            start = trainer.resume(model, opt, a.resume_adapter_file)
            print(f"Resumed from {a.resume_adapter_file} at iteration {start}", flush=True)
    elif a.test and a.adapter_path:
        from .tuner.adapters import load_adapters

        if (adapter_path / "adapter_config.json").exists():
            load_adapters(model, adapter_path)
    if group.size() > 1:
        loaded = time.monotonic() - started
        silent = f"rank {group.rank()}: no answer from the other ranks within {{:.0f}} s"
        wait = max(watchdog.timeout, SLOWEST_FACTOR * loaded)
        watchdog.expect(wait, silent.format(wait) + " (still loading, stuck or unreachable)")
        data_parallel.check_same(group, fingerprints(a, model, data, start if a.train else 0))
        # the model and adapters are set up alike everywhere; what draws from mx.random from
        # here on (LoRA dropout) draws each rank's own numbers, as separate examples need
        mx.random.seed(a.seed + 7919 * group.rank())
        # the first step compiles: it may take long (minutes on a busy machine)
        first = max(FIRST_STEP_FACTOR * watchdog.timeout, wait)
        watchdog.start_beats(silent + " (a rank is stuck or cannot be reached)", first)
    heartbeat = watchdog.beat if watchdog is not None else None
    if a.train:
        if lead:
            adapter_path.mkdir(parents=True, exist_ok=True)
            config = {k: v for k, v in vars(a).items() if k != "config"}
            save_config(config, adapter_path / "adapter_config.json")
        train_args = TrainingArgs(
            batch_size=a.batch_size,
            iters=a.iters,
            val_batches=a.val_batches,
            steps_per_report=a.steps_per_report,
            steps_per_eval=a.steps_per_eval,
            steps_per_save=a.save_every,
            max_seq_length=a.max_seq_length,
            grad_checkpoint=a.grad_checkpoint,
            grad_accumulation_steps=a.grad_accumulation_steps,
            clear_cache_threshold=a.clear_cache_threshold or 0,
        )
        final = trainer.train(
            model,
            opt,
            data["train"],
            data["valid"],
            train_args,
            diffusion,
            adapter_path,
            start,
            log=adapter_path / "train_log.jsonl",
            heartbeat=heartbeat,
        )
        print(f"Saved {final}", flush=True)
    if a.test:
        loss = trainer.evaluate_loss(
            model, data["test"], a.batch_size, a.test_batches, diffusion, heartbeat
        )
        print(f"Test loss {loss:.4f}", flush=True)
    if watchdog is not None:
        watchdog.clear()


def main(argv=None):
    stopped = "interrupted"
    if launched():  # mlx.launch stops the other ranks when one fails
        stopped = f"rank {os.environ.get('MLX_RANK', '?')}: interrupted (or stopped by mlx.launch)"
    with one_line_errors(stopped):
        run(settings(argv))


if __name__ == "__main__":
    main()
