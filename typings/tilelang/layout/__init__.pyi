# Shared-memory layouts used by tileprefill's TileLang programs.
from typing import Any

def make_swizzled_layout(buffer: Any) -> Any: ...
