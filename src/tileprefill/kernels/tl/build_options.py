"""Compile options a TileLang program factory asks for, read by `kernels.compile` when it builds.

Pure Python (no tilelang import): a factory module marks its factory, and the one compile path
(`kernels.compile.build`) passes the marked options to TileLang for every program of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar

Factory = TypeVar("Factory", bound=Callable[..., Any])

#: The attribute of a factory holding its TileLang pass configs.
PASS_CONFIGS_ATTRIBUTE: Final = "tileprefill_pass_configs"


def explicit_syncs(factory: Factory) -> Factory:
    """Mark `factory` as one whose programs place every barrier they need themselves: TileLang's
    own shared-memory barrier insertion is off for them.

    TileLang inserts a barrier of the thread range before a shared-memory write it cannot prove
    free of conflicts with earlier accesses by other threads; in a warp-specialized program whose
    warpgroups hand shared tiles over through mbarriers and named barriers, those barriers are
    redundant, and one inside a consumer's key loop made ptxas serialize its wgmma instructions
    (warning C7518). A marked program states each ordering it needs (mbarrier waits and
    arrivals, named barriers, proxy fences) in its own source.
    """
    setattr(factory, PASS_CONFIGS_ATTRIBUTE, {"tl.disable_thread_storage_sync": True})
    return factory


def pass_configs(factory: Callable[..., Any]) -> dict[str, Any]:
    """The TileLang pass configs `factory` asks for (none unless it is marked)."""
    configs: dict[str, Any] = getattr(factory, PASS_CONFIGS_ATTRIBUTE, {})
    return dict(configs)
