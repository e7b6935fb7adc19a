"""Stand-in for wandb on the lent GPU machine (no network, no wandb there).

sae_lens imports wandb at module level but calls it only when W&B logging is on; the benchmarks train with it
off. Never on the path anywhere else.
"""
