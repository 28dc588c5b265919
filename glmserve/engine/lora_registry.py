"""The engine's LoRA adapters by name (vLLM's LoRARequest): loaded at start-up or at run time, each load with a new
id; a request must name one that is loaded. Unloading an adapter that unfinished requests use is refused."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from glmserve.types import AdapterError, LoRAInUseError, LoRANotFoundError, LoRARequest, ParamError, Request

if TYPE_CHECKING:
    from glmserve.engine.lora_manager import LoRAManager


class LoRARegistry:
    def __init__(self, manager: LoRAManager | None):
        self.manager = manager  # None: LoRA serving is off
        self.adapters: dict[str, LoRARequest] = {}
        self._next_id = 1

    def add(self, name: str, path: str) -> LoRARequest:
        if self.manager is None:
            raise AdapterError("LoRA adapters need the server started with --enable-lora")
        if not name:
            raise AdapterError("an adapter needs a name")
        if name in self.adapters:
            raise AdapterError(f"the LoRA adapter {name!r} is already loaded")
        lora = LoRARequest(name, self._next_id, str(path))
        self.manager.weights(lora)  # read and checked now: a bad adapter fails its load, not a later request
        self._next_id += 1
        self.adapters[name] = lora
        return lora

    def remove(self, name: str, requests: Iterable[Request]) -> None:
        lora = self.adapters.get(name)
        if lora is None:
            raise LoRANotFoundError(f"The LoRA adapter {name!r} is not loaded")
        users = sum(1 for r in requests if r.sampling_params.lora_request == lora)
        if users:
            raise LoRAInUseError(f"the LoRA adapter {name!r} is in use by {users} unfinished request(s); unload it "
                                 "once they have finished")
        del self.adapters[name]
        self.manager.remove(lora.lora_int_id)

    def check(self, lora: LoRARequest | None) -> None:
        """A request's adapter must be loaded (this load of it)."""
        if lora is not None and self.adapters.get(lora.lora_name) != lora:
            raise ParamError(f"The LoRA adapter `{lora.lora_name}` is not loaded.", "model")
