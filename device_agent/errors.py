"""The device agent's error tree; foreign errors are translated into it where they arise.

    AgentError
    ├── StateDirError                 the state directory cannot be used as it is
    │   ├── NotEnrolledError          no identity yet: run `edgefleet-agent enroll` first
    │   ├── AlreadyEnrolledError      enrolling would overwrite an identity (use --force)
    │   └── CorruptStateError         files missing, damaged or readable by others
    ├── EnrollmentError               enrolling with the fleet service failed
    │   ├── InvalidTokenError         the join token is not one `edgefleet keys create` printed
    │   ├── CaFingerprintMismatchError  the server's CA is not the one the token pins
    │   ├── UntrustedServerError      the server's TLS certificate is not from the pinned CA
    │   ├── EnrollmentRefusedError    the service answered with a problem (expired key, bad CSR)
    │   └── ServiceUnreachableError   no HTTP answer at all (network, DNS, wrong URL)
    ├── ConnectionLostError           the MQTT connection could not be made or dropped
    ├── PayloadTooLargeError          a message exceeds the protocol's payload limit; not sent
    ├── OutboxError                   the on-disk outbox cannot be opened or written (outbox.py)
    ├── RenewalError                  a certificate renewal failed: refused, unanswered, unusable
    └── CommandFailed                 a command handler could not do its job (commands.py)

Every message names the object involved and what to do about it, because the CLI prints it as-is.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "AlreadyEnrolledError",
    "CaFingerprintMismatchError",
    "ConnectionLostError",
    "CorruptStateError",
    "EnrollmentError",
    "EnrollmentRefusedError",
    "InvalidTokenError",
    "NotEnrolledError",
    "PayloadTooLargeError",
    "RenewalError",
    "ServiceUnreachableError",
    "StateDirError",
    "UntrustedServerError",
]


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class StateDirError(AgentError):
    """The state directory cannot be used as it is."""


class NotEnrolledError(StateDirError):
    """The state directory holds no device identity."""


class AlreadyEnrolledError(StateDirError):
    """The state directory already holds an identity and ``--force`` was not given."""


class CorruptStateError(StateDirError):
    """A state file is missing, unreadable, damaged, or readable by other users."""


class EnrollmentError(AgentError):
    """Enrolling with the fleet service failed; nothing was written to the state directory."""


class InvalidTokenError(EnrollmentError):
    """The join token cannot be parsed or cannot be used."""


class CaFingerprintMismatchError(EnrollmentError):
    """The CA served at the token's URL is not the CA whose fingerprint the token carries."""

    def __init__(self, url: str, expected: str, got: str) -> None:
        super().__init__(
            f"the fleet CA served by {url} has fingerprint {got}, but the join token expects "
            f"{expected}: the server at {url} is not the fleet that issued this token; "
            "check the URL or ask for a new token"
        )
        self.url = url
        self.expected = expected
        self.got = got


class UntrustedServerError(EnrollmentError):
    """The service's TLS certificate does not verify against the pinned fleet CA."""


class EnrollmentRefusedError(EnrollmentError):
    """The service answered with an error (problem JSON), such as an expired registration key."""

    def __init__(self, url: str, status: int, detail: str) -> None:
        super().__init__(
            f"the fleet service refused the enrollment ({status} from {url}): {detail}"
        )
        self.url = url
        self.status = status
        self.detail = detail


class ServiceUnreachableError(EnrollmentError):
    """No HTTP answer from the service: refused, timed out, or the name does not resolve."""


class ConnectionLostError(AgentError):
    """The MQTT connection to the broker could not be made, or it dropped."""


class PayloadTooLargeError(AgentError):
    """A message is larger than fleet_protocol.MAX_PAYLOAD_BYTES, so it was not sent."""


class RenewalError(AgentError):
    """A certificate renewal failed; the device keeps its current certificate and tries again."""
