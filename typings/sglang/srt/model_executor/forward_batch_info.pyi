from enum import IntEnum

import torch

class ForwardMode(IntEnum):
    EXTEND = ...
    DECODE = ...
    MIXED = ...
    IDLE = ...
    TARGET_VERIFY = ...
    DRAFT_EXTEND_V2 = ...
    PREBUILT = ...
    SPLIT_PREFILL = ...
    DLLM_EXTEND = ...
    def is_decode(self) -> bool: ...
    def is_idle(self) -> bool: ...

class ForwardBatch:
    def __init__(
        self,
        *,
        forward_mode: ForwardMode,
        batch_size: int,
        input_ids: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        out_cache_loc: torch.Tensor,
        seq_lens_sum: int,
        seq_lens_cpu: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> None: ...
    forward_mode: ForwardMode
    batch_size: int
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor
    seq_lens_cpu: torch.Tensor | None
    out_cache_loc: torch.Tensor
    encoder_lens: torch.Tensor | None
    extend_num_tokens: int | None
    extend_seq_lens: torch.Tensor | None
    extend_prefix_lens: torch.Tensor | None
    extend_prefix_lens_cpu: list[int] | None
    extend_seq_lens_cpu: list[int] | None
