"""Device enrollment: a registration key and a CSR in, an identity out."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Request

from fleet_protocol import EnrollRequest, EnrollResponse
from fleet_service.api.deps import ContextDep, SessionDep, client_address
from fleet_service.api.problems import problem_responses
from fleet_service.context import ServiceContext
from fleet_service.enrollment import enroll_device

__all__ = ["router"]

router = APIRouter(tags=["enrollment"])

_RESPONSES = problem_responses(401, 403, 422, 429)
_RESPONSES[401]["description"] = "The registration key is not recognised"
_RESPONSES[403]["description"] = "The registration key is expired, used up or revoked"
_RESPONSES[422]["description"] = "The CSR is malformed or asks for its own identity"
_RESPONSES[429]["description"] = (
    "Too many enrollment attempts from this address (setting enroll_rate_per_address)"
)


@router.post("/enroll", responses=_RESPONSES)
def enroll(
    body: EnrollRequest,
    request: Request,
    context: ContextDep,
    session: SessionDep,
    background: BackgroundTasks,
) -> EnrollResponse:
    """Enroll a device with a registration key; its CSR's private key never leaves it.

    Every attempt counts against the caller's address (``enroll_rate_per_address``), right or
    wrong: past the limit even a correct key waits for Retry-After, so a guesser learns nothing
    from which answers are 429. Other addresses are unaffected."""
    address = client_address(request) or "-"
    context.limits.hit("enroll-address", address, what=f"enrollment attempts from {address}")
    enrolled = enroll_device(session, body, context.authority, context.enrollment_target)
    # After the commit: the broker's grants that follow a device's tags (integrations, site
    # bridges) are written now rather than at the policy loop's next poll.
    background.add_task(_wake_broker_policy, context)
    return enrolled


async def _wake_broker_policy(context: ServiceContext) -> None:
    context.wake_broker_policy()  # on the event loop: the policy's wake-up is an asyncio.Event
