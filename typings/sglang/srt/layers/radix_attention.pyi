from enum import Enum
from typing import Any

import torch

class AttentionType(Enum):
    DECODER = "decoder"
    DECODER_BIDIRECTIONAL = "decoder_bidirectional"
    ENCODER_ONLY = "encoder_only"

class RadixAttention(torch.nn.Module):
    tp_q_head_num: int
    tp_k_head_num: int
    tp_v_head_num: int
    head_dim: int
    qk_head_dim: int
    v_head_dim: int
    scaling: float
    layer_id: int
    logit_cap: float
    sliding_window_size: int
    is_cross_attention: bool
    use_irope: bool
    attn_type: AttentionType
    pos_encoding_mode: str
    logit_capping_method: str
    xai_temperature_len: int
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scaling: float,
        num_kv_heads: int,
        layer_id: int,
        logit_cap: float = 0.0,
        v_head_dim: int = -1,
        sliding_window_size: int = -1,
        is_cross_attention: bool = False,
        pos_encoding_mode: str = "NONE",
        logit_capping_method: str = "tanh",
        quant_config: Any = None,
        attn_type: AttentionType = ...,
        use_irope: bool = False,
        prefix: str = "",
        use_prefill_attention_wrapper: bool = True,
    ) -> None: ...
