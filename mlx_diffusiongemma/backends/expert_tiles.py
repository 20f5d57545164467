"""The CPU's expert strategy: gathered matmuls over tiles of rows that share one expert.

MLX's CPU `gather_mm` runs one GEMM per gathered batch element. mlx-lm's sorted layout makes
every (token, expert) row its own 1-row element, so each row re-reads its expert's weights: a
matrix-vector product per row, memory-bound. Here the rows, sorted by expert, are packed into
tiles of rows that all use one expert (an expert's last tile is padded), and the gathered matmul
runs one GEMM per tile: each tile reads its expert's weights once. Same ops, same order of
summation per output: the results equal the sorted gathered matmul's to float32 rounding.

The tile size comes from the exact per-expert counts (one host sync per MoE block, which the
exact tile count needs anyway): a GEMM call costs about TILE_OVERHEAD_ROWS rows of work on top
of its rows (B packing, thread start-up), and row counts that are multiples of 16 run at the
kernel's full width. `best_tile` weighs both. Speeds: benchmarks/RESULTS.md.

Metal and CUDA have real gathered-matmul kernels, so only the CPU backend (cpu.py) runs this.
It is still one graph of MLX ops, no Python loop over experts.
"""

import mlx.core as mx
import numpy as np

MAX_TILE = 32  # the fixed tile under mx.compile, where the counts cannot be read
TILE_SIZES = (4, 8, 16, 32, 48, 64, 80, 96, 112, 128)
# Per-call cost of a tile GEMM in rows of work, fitted on the Xeon above for the four expert
# matmul shapes (K x N from 1024 x 512 to 2816 x 1408): 39-45 rows.
TILE_OVERHEAD_ROWS = 40


def tile_rows(rows: int, num_experts: int) -> int:
    """Rows per tile for `rows` (token, expert) rows when the counts cannot be read (under
    mx.compile), or 0 to keep mlx-lm's row layout.

    Measured on the 2-core Xeon at both shapes above for 8 to 2048 tokens: with a = rows /
    experts, tiles win from a = 2, and the best fixed tile is about 2a rows (small tiles waste
    less padding, large ones make fewer calls), up to 32."""
    a = rows // num_experts
    if a < 2:
        return 0
    return min(MAX_TILE, 1 << (2 * a - 1).bit_length())


def best_tile(counts) -> int:
    """The tile size in TILE_SIZES with the least estimated cost for these per-expert row
    counts: sum over experts of ceil(count / T) calls, each costing TILE_OVERHEAD_ROWS + T."""
    counts = np.asarray(counts, dtype=np.int64)
    counts = counts[counts > 0]

    def cost(T):
        return int(((counts + T - 1) // T).sum()) * (TILE_OVERHEAD_ROWS + T)

    return min(TILE_SIZES, key=cost)


def tile_layout(idx, num_experts: int, tile: int):
    """Place the flat (token, k) assignments of `idx` (N, k) into expert-pure tiles.

    Returns (src, tile_expert, dest, tile): padded row r takes assignment src[r] (padding rows
    take assignment 0: computed, never read), tile b uses expert tile_expert[b], and assignment
    a's result sits in padded row dest[a]. The tile size is `best_tile` of the counts, or under
    mx.compile (nothing can be evaluated) `tile` with the bound on the tile count.
    """
    flat = idx.reshape(-1).astype(mx.int32)
    A = flat.size
    order = mx.argsort(flat)
    se = flat[order]
    counts = mx.zeros((num_experts,), mx.int32).at[se].add(mx.ones_like(se))
    start = mx.cumsum(counts) - counts  # first sorted row of each expert
    tile, n_tiles = _tile_size_and_count(counts, A, num_experts, tile)
    tiles = (counts + tile - 1) // tile
    tile_end = mx.cumsum(tiles)
    rank = mx.arange(A, dtype=mx.int32) - start[se]
    dest_sorted = (tile_end - tiles)[se] * tile + rank
    src = mx.zeros((n_tiles * tile,), mx.int32).at[dest_sorted].add(order.astype(mx.int32))
    dest = mx.zeros((A,), mx.int32).at[order].add(dest_sorted)
    b = mx.arange(n_tiles, dtype=mx.int32)
    # Tile b belongs to the first expert whose tiles end after it (bound-size dummies: the last).
    tile_expert = (b[:, None] >= tile_end[None, :]).astype(mx.int32).sum(axis=-1)
    tile_expert = mx.minimum(tile_expert, num_experts - 1).astype(mx.uint32)
    return src, tile_expert, dest, tile


def _tile_size_and_count(counts, A: int, num_experts: int, tile: int):
    """(best_tile, exact tile count) from the counts (one host sync), or under mx.compile/vmap,
    where nothing may be evaluated, (tile, the most tiles there can be: sum(ceil(c/T)) <=
    (A + H(T-1)) / T for H hit experts). Exact saves ~25% (the dummy tiles' GEMMs)."""
    try:
        host = np.array(counts)
    except ValueError:
        H = min(num_experts, A)
        return tile, (A + H * (tile - 1)) // tile
    tile = best_tile(host)
    return tile, max(int(((host + tile - 1) // tile).sum()), 1)


def tiled_experts(x, idx, gate_up, down, act, num_experts: int, tile: int):
    """x (N, D), idx (N, k) -> per-assignment outputs (N, k, D).

    gate_up(x, experts) and down(h, experts) are gathered matmuls over (tiles, tile, .) rows;
    act maps the gate|up halves to the down projection's input."""
    N, k = idx.shape
    src, tile_expert, dest, tile = tile_layout(idx, num_experts, tile)
    xp = x[src // k].reshape(-1, tile, x.shape[-1])
    h = act(gate_up(xp, tile_expert))
    y = down(h, tile_expert)
    return y.reshape(-1, y.shape[-1])[dest].reshape(N, k, -1)
