"""vLLM's runtime LoRA routes: POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter
{lora_name}, registered only when VLLM_ALLOW_RUNTIME_LORA_UPDATING (or GLMSERVE_ALLOW_RUNTIME_LORA_UPDATING) is
true, as in vLLM. The adapter is read and checked in the engine's thread between two steps; a bad one is a 400,
an unknown name to unload a 404, and unloading an adapter that unfinished requests use is refused with a 409
(glmserve does not wait for them: the client retries once they have finished).
"""

from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from glmserve.serving.errors import APIError
from glmserve.serving.state import ServerState
from glmserve.types import LoRAInUseError, LoRANotFoundError

_FLAGS = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "GLMSERVE_ALLOW_RUNTIME_LORA_UPDATING")


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None  # accepted (vLLM's field); the name decides


def runtime_updates_allowed() -> bool:
    return any(os.environ.get(flag, "").strip().lower() in ("1", "true") for flag in _FLAGS)


def lora_router(state: ServerState) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/load_lora_adapter")
    async def load(req: LoadLoRAAdapterRequest) -> PlainTextResponse:
        if req.lora_name in state.model_names:
            raise APIError(400, f"`{req.lora_name}` is the base model's name", "lora_name")
        try:
            lora = await state.client.call(lambda engine: engine.add_lora(req.lora_name, req.lora_path))
        except ValueError as e:
            raise APIError(400, str(e), "lora_path") from None
        state.client.loras[lora.lora_name] = lora
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @router.post("/unload_lora_adapter")
    async def unload(req: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        try:
            await state.client.call(lambda engine: engine.remove_lora(req.lora_name))
        except LoRANotFoundError as e:
            raise APIError(404, str(e), "lora_name", "model_not_found") from None
        except LoRAInUseError as e:
            raise APIError(409, str(e), "lora_name") from None
        state.client.loras.pop(req.lora_name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    return router
