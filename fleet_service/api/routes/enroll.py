"""Device enrollment: a registration key and a CSR in, an identity out."""

from __future__ import annotations

from fastapi import APIRouter

from fleet_protocol import EnrollRequest, EnrollResponse
from fleet_service.api.deps import ContextDep, SessionDep
from fleet_service.enrollment import enroll_device

__all__ = ["router"]

router = APIRouter(tags=["enrollment"])


@router.post(
    "/enroll",
    responses={
        401: {"description": "the registration key is not recognised"},
        403: {"description": "the registration key is expired, used up or revoked"},
        422: {"description": "the CSR is malformed or asks for its own identity"},
    },
)
def enroll(body: EnrollRequest, context: ContextDep, session: SessionDep) -> EnrollResponse:
    """Enroll a device with a registration key; its CSR's private key never leaves it."""
    return enroll_device(session, body, context.authority, context.enrollment_target)
