"""Replay buffers of past episodes that methods inject into later batches: ARPO's per-task success buffer
(``success_buffer``) and SPEAR's self-imitation buffer (``sil_buffer``). Both are ``nn.Module``s whose rows are
extra state, so they are in the Lightning checkpoint (per rank under data parallelism: common/rank_state.py)."""
