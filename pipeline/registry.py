"""One explicit registry per kind (networks, losses, penalties, feature extractors, benchmarks).

    NETWORKS = Registry("network")
    @NETWORKS.register("dcgan")
    def build_dcgan(...): ...
    NETWORKS.get("dcgan")          # KeyError-free: a ConfigError naming the allowed keys

The keys are the values allowed in configs; config fields use `choices=NETWORKS.keys`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from pipeline.errors import ConfigError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj
        return deco

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} '{name}'; choose one of {', '.join(self.keys())}")
        return self._items[name]

    def keys(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())
