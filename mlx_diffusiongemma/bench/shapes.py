"""Model shapes the benchmarks run at, and the targets and peer figures they are compared with."""

# google/diffusiongemma-26B-A4B-it, text part (see the facts file in the project's shared notes).
FULL_TEXT = dict(
    vocab_size=262144,
    hidden_size=2816,
    intermediate_size=2112,
    num_hidden_layers=30,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    global_head_dim=512,
    num_global_key_value_heads=2,
    attention_k_eq_v=True,
    sliding_window=1024,
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=704,
    max_position_embeddings=262144,
    final_logit_softcapping=30.0,
    rms_norm_eps=1e-6,
    use_bidirectional_attention="vision",
)
FULL_CANVAS = 256
# The mid-size peer checkpoint: full-model proportions at ~1/3 width, 6 layers (5 sliding + 1 full).
MID_TEXT = dict(
    vocab_size=32768,
    hidden_size=1024,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=128,
    global_head_dim=256,
    num_global_key_value_heads=1,
    sliding_window=1024,
    num_experts=64,
    top_k_experts=8,
    moe_intermediate_size=256,
    max_position_embeddings=8192,
)
# A small shape with the same structure, for dry runs of the GPU path on a CPU (`--shape tiny`).
TINY_TEXT = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    global_head_dim=128,
    num_global_key_value_heads=1,
    sliding_window=128,
    num_experts=16,
    top_k_experts=4,
    moe_intermediate_size=64,
    max_position_embeddings=8192,
)
SHAPES = {"full": FULL_TEXT, "mid": MID_TEXT, "tiny": TINY_TEXT}
# Targets and figures from peers (facts file).
TARGETS = dict(
    resident_4bit_gb=16.0,
    peak_4096_gb=18.0,
    sampler_share=0.10,
    vs_mlx_vlm=2.0,
    vs_reference=1.0,
    vs_autoregressive=3.0,
)
VLLM_H100 = dict(canvas_ms=145.7, step_ms=9.1, tok_s=895.0)
NO_STOP = (
    1e-30  # a confidence threshold no mean entropy falls below: every canvas runs all its steps
)
