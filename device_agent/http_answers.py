"""Reading the service's HTTPS answers: problem+json details and TLS verification failures."""

from __future__ import annotations

import ssl

import httpx

__all__ = ["caused_by_cert_verification", "problem_detail"]

# Enough to name the problem in a CLI line or a log record, not a whole HTML error page.
_MAX_DETAIL_CHARS = 300


def caused_by_cert_verification(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a failed certificate verification."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def problem_detail(response: httpx.Response) -> str:
    """The human part of a problem JSON (``detail``, else ``title``), or the start of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("title")
        if isinstance(detail, str) and detail:
            return detail[:_MAX_DETAIL_CHARS]
        if isinstance(detail, list):
            # FastAPI's own request validation errors: a list of {loc, msg, ...}.
            parts = [
                f"{'.'.join(str(p) for p in item.get('loc', []))}: {item.get('msg', '')}"
                for item in detail
                if isinstance(item, dict)
            ]
            return "; ".join(parts)[:_MAX_DETAIL_CHARS]
    text = response.text.strip()
    return text[:_MAX_DETAIL_CHARS] if text else response.reason_phrase
