"""Several processes (several Macs) as one DiffusionGemma, on MLX's distributed engine
(`mx.distributed`, `mlx.nn.layers.distributed`, `mlx.launch`).

Tensor parallel (`Model.shard`): each layer's attention is split by heads (q/k/v all-to-sharded,
o sharded-to-all: MLX's `shard_linear`), so the prompt cache is split by heads too; where a layer
has fewer KV heads than ranks, each rank keeps the one KV head its query heads read. The dense
MLP and the experts are split along their intermediate width, in whole quantization groups (the
mlx-community experts' 704 = 11 groups of 64 go 6/5 over two ranks, which MLX's even
`shard_inplace` refuses): every rank runs each token's k experts over its part of the width, so
the work is even whatever the routing and no shape depends on it. A layer sums across ranks
twice: the attention output (in o_proj), and the dense MLP's and experts' partial outputs
together in one all_sum (`sum_over_ranks`); the norms after them need the whole sums. The router,
the norms, the embeddings, the self-conditioning MLP and the vision tower are replicated. The
encoder and the decoder share the layers, so both run split.

Pipeline (`Model.pipeline`): each rank keeps a run of layers (mlx-lm's `PipelineMixin`: rank 0
the last ones); the hidden state goes from stage to stage (send / recv), each rank's layers keep
their K/V there, and the decoder's output is gathered to every rank, which all run the sampler
alike.

Every rank draws the same noise: the same seed, or without one rank 0's clock (`shared_seed`).
What keeps a run from hanging or computing garbage: a connection deadline (`init_group`), a
fingerprint of the checkpoint compared at load (`check_same_checkpoint`), the encoded tokens
compared (`same_on_every_rank`), and a watchdog on the other ranks (`Watchdog`). MLX's ring
backend itself raises when a peer's connection closes (a rank that dies); it waits forever for a
peer that stops answering, and rank 0 waits forever at start for one that never comes.
"""

import atexit
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import numpy as np
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models.pipeline import PipelineMixin

from .cli import launched, say_error

CONNECT_TIMEOUT = float(os.environ.get("MLX_DG_CONNECT_TIMEOUT", 45))
PEER_TIMEOUT = float(os.environ.get("MLX_DG_PEER_TIMEOUT", 30))  # 0: no watchdog
HEARTBEAT_EVERY = 1.0
LAYER_KEY = re.compile(r"model\.(?:decoder|encoder\.language_model)\.layers\.(\d+)\.")
SAMPLE_BLOCKS, BLOCK_BYTES = 64, 4096
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)

_spanning = None  # the group this process's model spans, for `shared_seed`
_launched_group = None  # init_group's, once made


class DistributedError(ValueError):
    """A run that cannot go on across ranks: a split that cannot be made, another checkpoint or
    prompt on some rank, a peer that cannot be reached (the commands' one-line errors)."""


# ---- groups ------------------------------------------------------------------------------------
# A process that waits for its parent to close its stdin, and kills it with `error: ...` after
# the given seconds if it has not.
DEADLINE = """import os, select, signal, sys
if not select.select([sys.stdin], [], [], float(sys.argv[2]))[0]:
    os.write(2, ("error: " + sys.argv[3] + "\\n").encode())
    os.kill(int(sys.argv[1]), signal.SIGKILL)
"""


@contextmanager
def deadline(seconds: float, message: str):
    """Ends the process with `error: message` if the block takes more than `seconds`. MLX's ring
    backend waits forever for a peer that never connects, holding the GIL (so no thread of
    this process could do it): a small watcher process does."""
    argv = [sys.executable, "-I", "-c", DEADLINE, str(os.getpid()), str(seconds), message]
    watcher = subprocess.Popen(argv, stdin=subprocess.PIPE)
    try:
        yield
    finally:
        watcher.stdin.close()
        watcher.wait()


def fail(message: str):
    """One line on stderr and exit status 1, from any thread (a watchdog's). The line is left
    out when the process has written its final error already (its main thread saw the peer
    go too, and is on its way out: this ends it, should that way hang)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    say_error(message, _stderr_fd)
    os._exit(1)


_stderr_fd = 2


def init_group():
    """The group this process was launched in (size 1 when it was not), with a watchdog on the
    other ranks; a peer that cannot be reached ends it with one line. Made once per process."""
    global _launched_group
    if not launched():
        return mx.distributed.init()
    if _launched_group is not None:
        return _launched_group
    with deadline(
        CONNECT_TIMEOUT, f"could not connect to the other ranks in {CONNECT_TIMEOUT:.0f} s"
    ):
        try:
            group = mx.distributed.init(strict=True)
        except RuntimeError as e:
            raise DistributedError(f"could not connect to the other ranks: {e}") from None
        if group.size() > 1 and PEER_TIMEOUT > 0:
            Watchdog(group, PEER_TIMEOUT)
    _launched_group = group
    return group


def spanning(group):
    """`group` when it holds several ranks, else None; remembered for `shared_seed`."""
    global _spanning
    if group is None or group.size() == 1:
        return None
    _spanning = group
    return group


def shared_seed(seed: int) -> int:
    """`seed` on one process; across the ranks a model spans, rank 0's (an unseeded run seeds
    from the clock, which differs between processes)."""
    g = _spanning
    if g is None:
        return seed
    mine = mx.array(seed if g.rank() == 0 else 0, dtype=mx.int64)
    seed = mx.distributed.all_sum(mine, group=g, stream=mx.cpu)
    mx.eval(seed)  # (mx.eval lets other threads run while it waits: the watchdog's)
    return int(seed.item())


def differing_ranks(group, digest: bytes) -> List[int]:
    """The ranks whose `digest` (32 bytes) differs from rank 0's."""
    mine = mx.array(np.frombuffer(digest, dtype=np.int32))[None]  # (1, 8)
    every = mx.distributed.all_gather(mine, group=group, stream=mx.cpu)
    mx.eval(every)  # (mx.eval lets other threads run while it waits: the watchdog's)
    every = np.array(every)
    return [r for r in range(1, len(every)) if (every[r] != every[0]).any()]


def same_on_every_rank(group, ids, vision=None):
    """Raises unless every rank encodes the same tokens and image features: ranks that do not
    would run collectives of other shapes (a hang) or mix other prompts (garbage)."""
    digest = hashlib.sha256(repr(ids.shape).encode() + np.array(ids).tobytes())
    for features, _, _ in vision or ():
        digest.update(np.array(features.astype(mx.float32)).tobytes())
    others = differing_ranks(group, digest.digest())
    if others:
        raise DistributedError(
            f"rank {others[0]} was given another prompt (or images) than rank 0: every rank "
            "must get the same"
        )


# ---- tensor parallel -----------------------------------------------------------------------------
def split_bounds(width: int, ranks: int, unit: int = 1) -> List[int]:
    """ranks + 1 boundaries cutting `width` into runs of whole `unit`s, as even as they go (the
    first ranks take the extra units)."""
    units, extra = divmod(width // unit, ranks)
    counts = [units + (r < extra) for r in range(ranks)]
    return [unit * sum(counts[:r]) for r in range(ranks + 1)]


def _take(a, axis, lo, hi):
    index = [slice(None)] * a.ndim
    index[axis] = slice(lo, hi)
    return a[tuple(index)]


def keep_outputs(module, runs):
    """Keeps the output rows in `runs` [(lo, hi), ...] of a (switch) linear, quantized or not,
    in place; copies, so that the whole tensor can be freed."""
    update = {}
    for name in ("weight", "scales", "biases", "bias"):
        a = module.get(name)
        if isinstance(a, mx.array):
            axis = -1 if name == "bias" else -2
            update[name] = mx.contiguous(
                mx.concatenate([_take(a, axis, lo, hi) for lo, hi in runs], axis=axis)
            )
    module.update(update)


def keep_inputs(module, lo, hi):
    """Keeps the input columns lo:hi of a bias-free (switch) linear in place; quantized, lo and
    hi are whole groups."""
    if isinstance(module.get("bias"), mx.array):
        raise DistributedError("a linear with a bias cannot be split along its input")
    update = {}
    if isinstance(module.get("scales"), mx.array):
        gs, bits = module.group_size, module.bits
        update["weight"] = _take(module.weight, -1, lo * bits // 32, hi * bits // 32)
        for name in ("scales", "biases"):
            if isinstance(module.get(name), mx.array):
                update[name] = _take(module[name], -1, lo // gs, hi // gs)
    else:
        update["weight"] = _take(module.weight, -1, lo, hi)
    module.update({k: mx.contiguous(v) for k, v in update.items()})


def width_split(width: int, down, ranks: int, rank: int, what: str):
    """This rank's [lo, hi) of an intermediate width whose down projection is `down`: whole
    quantization groups when it is quantized."""
    unit = down.group_size if isinstance(down.get("scales"), mx.array) else 1
    if width // unit < ranks:
        groups = f"{width // unit} groups of {unit}" if unit > 1 else f"{width} columns"
        raise DistributedError(f"the {what} ({groups}) cannot be split over {ranks} ranks")
    bounds = split_bounds(width, ranks, unit)
    return bounds[rank], bounds[rank + 1]


def shard_attention(attn, group):
    """Heads split over the ranks; fewer KV heads than ranks are replicated (each rank keeps the
    one its query heads read)."""
    N, r = group.size(), group.rank()
    H, Hk, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    if H % N:
        raise DistributedError(f"{H} attention heads cannot be split over {N} ranks")
    if Hk % N and N % Hk:
        raise DistributedError(
            f"{Hk} KV heads can be neither split over nor replicated across {N} ranks"
        )
    o = attn.o_proj
    if isinstance(o.get("scales"), mx.array) and (H * hd // o.group_size) % N:
        raise DistributedError(
            f"o_proj's {H * hd // o.group_size} quantization groups cannot be split over {N} ranks"
        )
    attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
    kv = [n for n in ("k_proj", "v_proj") if n in attn]
    if Hk % N == 0:
        for name in kv:
            setattr(attn, name, shard_linear(attn[name], "all-to-sharded", group=group))
        attn.n_kv_heads = Hk // N
    else:
        head = r * Hk // N
        for name in kv:
            keep_outputs(attn[name], [(head * hd, (head + 1) * hd)])
        attn.n_kv_heads = 1
    attn.n_heads = H // N


def shard_layer(layer, group):
    """A decoder layer split for tensor parallelism (see the module's docstring)."""
    N, r = group.size(), group.rank()
    if N == 1:
        return
    shard_attention(layer.self_attn, group)
    mlp = layer.mlp
    width = mlp.gate_proj.weight.shape[-2]
    lo, hi = width_split(width, mlp.down_proj, N, r, "dense MLP's intermediate")
    keep_outputs(mlp.gate_proj, [(lo, hi)])
    keep_outputs(mlp.up_proj, [(lo, hi)])
    keep_inputs(mlp.down_proj, lo, hi)
    ex = layer.experts
    inter = ex.inter
    lo, hi = width_split(inter, ex.down_proj, N, r, "experts' intermediate")
    keep_outputs(ex.gate_up_proj, [(lo, hi), (inter + lo, inter + hi)])
    keep_inputs(ex.down_proj, lo, hi)
    ex.inter = hi - lo
    layer.sharding_group = group


def sum_over_ranks(group, a, b):
    """all_sum of a and b in one collective: (a, b) summed over the ranks."""
    both = mx.distributed.all_sum(mx.concatenate([a, b.astype(a.dtype)], axis=-1), group=group)
    n = a.shape[-1]
    return both[..., :n], both[..., n:].astype(b.dtype)


# ---- pipeline ------------------------------------------------------------------------------------
def stage_layers(num_layers: int, group, split=None) -> range:
    """The layers a rank keeps, as mlx-lm's `PipelineMixin.pipeline` splits them."""
    stage = PipelineMixin()
    stage.layers = list(range(num_layers))
    stage.pipeline(group, split)
    return range(stage.start_idx, stage.end_idx)


def layer_of(key: str) -> Optional[int]:
    """The text layer a checkpoint key belongs to, or None (embeddings, norms, vision)."""
    m = LAYER_KEY.match(key)
    return None if m is None else int(m.group(1))


# ---- loading -------------------------------------------------------------------------------------
def sharded_load(
    path_or_repo,
    pipeline_group=None,
    tensor_group=None,
    *,
    pipeline_split=None,
    dtype=None,
):
    """mlx-lm's `sharded_load` for DiffusionGemma: (model, tokenizer), the model split over
    `tensor_group` (tensor parallel) and/or `pipeline_group` (pipeline, `pipeline_split` layers
    per rank, default even); with neither, tensor parallel over the launched group. Each rank
    reads only what it keeps: pipelined, only the files holding its layers (from the hub, only
    those are downloaded); split, each layer's tensors are read whole and cut one layer at a time.
    Every rank checks that the others load the same checkpoint."""
    from .config import ModelArgs
    from .loader import load, read_config, resolve_path, weight_file_names

    if pipeline_group is None and tensor_group is None:
        tensor_group = init_group()
    local = Path(path_or_repo).expanduser().exists()
    path = resolve_path(path_or_repo, tokenizer=True, weights=None if local else ())
    layers = None
    if pipeline_group is not None:
        n = ModelArgs.from_config(read_config(path)).num_hidden_layers
        layers = stage_layers(n, pipeline_group, pipeline_split)
    if not local:  # without an index, its one file
        names = weight_file_names(path, layers) or None
        path = resolve_path(path_or_repo, tokenizer=True, weights=names)
    shared = weight_file_names(path, None if layers is None else range(0))
    mode = [
        None if tensor_group is None else tensor_group.size(),
        None if pipeline_group is None else (pipeline_group.size(), pipeline_split),
        str(dtype),
    ]
    check_same_checkpoint(mx.distributed.init(), path, shared, repr(mode))
    model, tokenizer = load(
        path,
        dtype=dtype,
        pipeline_group=pipeline_group,
        pipeline_split=pipeline_split,
        tensor_group=tensor_group,
    )
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))  # every rank loaded
    return model, tokenizer


def checkpoint_fingerprint(path: Path, names, settings: str) -> bytes:
    """sha256 of the loading settings, the config, tokenizer and index files, and of each named
    weight file its size, header and SAMPLE_BLOCKS blocks spread over its data (a checkpoint
    with other weights differs there; hashing all of a 16 GB checkpoint would take a while)."""
    path = Path(path)
    h = hashlib.sha256(settings.encode())
    meta = ("config.json", "generation_config.json", "model.safetensors.index.json")
    for name in meta + TOKENIZER_FILES:
        f = path / name
        h.update(name.encode() + (f.read_bytes() if f.is_file() else b"-"))
    for name in sorted(names):
        f = path / name
        size = f.stat().st_size
        h.update(name.encode() + size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            start = 8 + int.from_bytes(fh.read(8), "little")
            h.update(fh.read(start - 8))
            for i in range(SAMPLE_BLOCKS):
                fh.seek(start + (size - start) * i // SAMPLE_BLOCKS)
                h.update(fh.read(BLOCK_BYTES))
    return h.digest()


def check_same_checkpoint(group, path, names, settings: str):
    """Raises on every rank unless all load the same checkpoint with the same settings."""
    if group.size() == 1:
        return
    others = differing_ranks(group, checkpoint_fingerprint(path, names, settings))
    if others:
        raise DistributedError(
            f"rank {others[0]} holds another checkpoint than rank 0 (or was started with other "
            f"flags): every rank must load the same files ({Path(path).name})"
        )


# ---- watchdog and output -------------------------------------------------------------------------
class Watchdog:
    """Heartbeats between the ranks (UDP, every HEARTBEAT_EVERY s, on the addresses the launcher
    gave them). MLX's collectives can wait forever on a peer: one that stopped answering (a
    frozen process, a machine or link gone without closing its sockets), and at times one whose
    process died (measured: the ring backend raised within a second in some runs, waited in
    others). A rank ends with one line when another's heartbeats stop for `timeout` s, or at
    once when its port refuses them (its process is gone). A rank that exits says goodbye."""

    def __init__(self, group, timeout: float):
        self.rank, self.timeout = group.rank(), timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))
        ip = _own_address(self.rank)
        mine = mx.array([[_ip_number(ip), self.sock.getsockname()[1]]], dtype=mx.int64)
        table = mx.distributed.all_gather(mine, group=group, stream=mx.cpu)
        mx.eval(table)
        table = table.tolist()
        if any(ip < 0 for ip, _ in table):  # an address unknown to some rank: no watchdog
            self.sock.close()
            return
        self.out = {}  # a connected socket per peer: its refusals are reported on the next send
        for r, (ip, port) in enumerate(table):
            if r != self.rank:
                self.out[r] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.out[r].connect((socket.inet_ntoa(ip.to_bytes(4, "big")), port))
        self.heard = {r: time.monotonic() for r in self.out}
        threading.Thread(target=self.run, daemon=True).start()
        atexit.register(self.say, b"bye")

    def say(self, word: bytes) -> list:
        """Sends `word` to every peer; the peers whose port refused it."""
        refused = []
        for r, sock in self.out.items():
            try:
                sock.send(word + b" %d" % self.rank)
            except ConnectionRefusedError:
                refused.append(r)
            except OSError:
                pass
        return refused

    def hear(self, timeout: Optional[float]):
        """Reads what came in (waiting up to `timeout`; None: only what is there)."""
        self.sock.settimeout(timeout if timeout else 0.0)
        while True:
            try:
                word, rank = self.sock.recvfrom(64)[0].split()
            except (OSError, ValueError):  # nothing (more) yet, or a stray datagram
                return
            if word == b"bye":
                self.heard.pop(int(rank), None)
            elif int(rank) in self.heard:
                self.heard[int(rank)] = time.monotonic()
            if timeout:
                return

    def run(self):
        beat = 0.0
        while True:
            now = time.monotonic()
            if now >= beat:
                refused = self.say(b"alive")
                beat = now + HEARTBEAT_EVERY
                if refused:
                    self.hear(None)  # a goodbye sent before its port closed
                for rank in refused:
                    if rank in self.heard:
                        fail(f"rank {rank} is gone (its process ended)")
            self.hear(HEARTBEAT_EVERY / 4)
            for rank, seen in list(self.heard.items()):
                if time.monotonic() - seen > self.timeout:
                    fail(
                        f"rank {rank} has not answered for {self.timeout:.0f} s (stopped, or its "
                        "machine or link is down)"
                    )


def _own_address(rank: int) -> Optional[str]:
    """This rank's IPv4 address as the launcher gave it: its entry in the ring backend's
    hostfile, or (JACCL) the interface that reaches the coordinator."""
    try:
        hostfile = os.environ.get("MLX_HOSTFILE")
        if hostfile and Path(hostfile).is_file():
            entry = json.loads(Path(hostfile).read_text())[rank]
            return (entry[0] if isinstance(entry, list) else entry).rsplit(":", 1)[0]
        coordinator = os.environ.get("MLX_JACCL_COORDINATOR")
        if coordinator:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((coordinator.rsplit(":", 1)[0], 9))
                return s.getsockname()[0]
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError):
        pass
    return None


def _ip_number(ip: Optional[str]) -> int:
    try:
        return int.from_bytes(socket.inet_aton(ip), "big")
    except (OSError, TypeError):
        return -1


def rank_zero_output(group):
    """Only rank 0 writes to stdout; MLX's ring backend's own lines about a lost peer (one per
    failed socket call, before it raises) are left out of stderr unless MLX_RING_VERBOSE."""
    global _stderr_fd
    if group.rank() != 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    if os.environ.get("MLX_RING_VERBOSE") or _stderr_fd != 2:
        return
    sys.stderr.flush()
    _stderr_fd = os.dup(2)  # Python's own stderr writes there directly
    sys.stderr = open(_stderr_fd, "w", buffering=1, closefd=False)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def forward():
        with open(read, "rb") as pipe:
            for line in pipe:
                if not line.startswith(b"[ring] "):
                    os.write(_stderr_fd, line)

    threading.Thread(target=forward, daemon=True).start()
