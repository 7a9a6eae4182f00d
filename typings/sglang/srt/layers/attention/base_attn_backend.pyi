from typing import Any

import torch
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.model_executor.forward_batch_info import ForwardBatch

class AttentionBackend:
    forward_metadata: object | None
    kv_index_translator: Any
    needs_cpu_seq_lens: bool
    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None: ...
    def init_forward_metadata_out_graph(
        self, forward_batch: ForwardBatch, in_capture: bool = False
    ) -> None: ...
    def init_forward_metadata_in_graph(self, forward_batch: ForwardBatch) -> None: ...
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None: ...
    def get_cuda_graph_seq_len_fill_value(self) -> int: ...
    def support_triton(self) -> bool: ...
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs: Any,
    ) -> Any: ...
    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs: Any,
    ) -> Any: ...
    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs: Any,
    ) -> Any: ...
