"""Model presets for ``linghe prewarm``: the shapes a training step of that model launches.

Each op's ``register_prewarm`` function reads the keys it needs. Keys:
hidden (model width), moe_ffn (routed-expert FFN width; SwiGLU input is 2x),
ffn (shared/dense FFN width), num_experts, topk, heads / kv_heads / head_dim
(attention), linear_attn_groups (GroupNormGate), vocab, dtype (activations).
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    # The model of TARGETS.md: hidden 2048, 256 experts, top-8.
    "moe-2048": dict(hidden=2048, moe_ffn=1024, ffn=2048, num_experts=256, topk=8, heads=16, kv_heads=4,
                     head_dim=128, linear_attn_groups=4, vocab=157184, dtype="bf16"),
    # A larger model: hidden 7168, 256 experts, top-8 (DeepSeek-V3-like widths).
    "moe-7168": dict(hidden=7168, moe_ffn=2048, ffn=18432, num_experts=256, topk=8, heads=128, kv_heads=8,
                     head_dim=128, linear_attn_groups=8, vocab=129280, dtype="bf16"),
    # A mid-size model: hidden 4096, 128 experts, top-8.
    "moe-4096": dict(hidden=4096, moe_ffn=1536, ffn=12288, num_experts=128, topk=8, heads=32, kv_heads=8,
                     head_dim=128, linear_attn_groups=8, vocab=151936, dtype="bf16"),
}
DEFAULT_PRESET = "moe-2048"


def get(name: str) -> dict:
    try:
        preset = dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
    preset.setdefault("norm_hidden", sorted({preset["hidden"]}))
    return preset
