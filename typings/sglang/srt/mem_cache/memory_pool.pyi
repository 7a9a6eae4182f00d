import torch

class ReqToTokenPool:
    size: int
    max_context_len: int
    req_to_token: torch.Tensor

class KVCache:
    size: int
    page_size: int
    dtype: torch.dtype
    store_dtype: torch.dtype
    layer_num: int
    start_layer: int
    device: str | torch.device
    def get_key_buffer(self, layer_id: int) -> torch.Tensor: ...
    def get_value_buffer(self, layer_id: int) -> torch.Tensor: ...

class MHATokenToKVPool(KVCache):
    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str,
        enable_memory_saver: bool,
        v_head_dim: int | None = None,
        *,
        enable_alt_stream: bool = True,
    ) -> None: ...
    head_num: int
    head_dim: int
    v_head_dim: int
    kv_cache_layout: str
    @property
    def is_quantized_kv_cache(self) -> bool: ...
