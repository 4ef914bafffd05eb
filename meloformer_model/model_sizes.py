"""The model sizes, free of torch so configs can name them where torch is not imported (the
Dagster definitions)."""

# Sizes (design.md §1, head dim 64) plus a tiny one for tests and CPU demos.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_embd=128, n_head=2, n_kv_head=2, ffn_hidden=352),
    "small": dict(n_layer=6, n_embd=256, n_head=4, n_kv_head=4, ffn_hidden=1408),
    "base": dict(n_layer=12, n_embd=512, n_head=8, n_kv_head=8, ffn_hidden=2816),
    "large": dict(n_layer=16, n_embd=768, n_head=12, n_kv_head=12, ffn_hidden=4096),
    "xlarge": dict(n_layer=24, n_embd=1024, n_head=16, n_kv_head=16, ffn_hidden=5632),
}
