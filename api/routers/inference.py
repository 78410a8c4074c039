from fastapi import APIRouter

from api.completions import respond
from api.deps import Tenant
from api.errors import declare
from shared.inference.schemas import ChatCompletionCreate, CompletionCreate

router = APIRouter(prefix="/v1", tags=["inference"], responses=declare(429, 504))


@router.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionCreate, tenant: Tenant):
    """A chat completion from a base model or one of the tenant's fine-tuned models (`stream: true` for
    server-sent chunks ending with `data: [DONE]`)."""
    return await respond(body, tenant, chat=True)


@router.post("/completions")
async def create_completion(body: CompletionCreate, tenant: Tenant):
    """A text completion of one prompt, for models used without their chat template."""
    return await respond(body, tenant, chat=False)
