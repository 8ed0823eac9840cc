"""Generate the AsyncAPI 3 document of the topic contract from the payload models.

``python -m fleet_protocol.asyncapi > fleet_protocol/asyncapi.json`` (``make asyncapi``)
rewrites the checked-in copy; a test fails when that copy is stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fleet_protocol.control import (
    CertificateMessage,
    CommandMessage,
    DesiredState,
    ReceiptMessage,
)
from fleet_protocol.messages import (
    SCHEMA_VERSION,
    AckMessage,
    CsrMessage,
    LogMessage,
    ReportedState,
    ResultMessage,
    StatusMessage,
    TelemetryMessage,
)
from fleet_protocol.topics import DEFAULT_PREFIX

__all__ = ["CHECKED_IN", "build_document", "render"]

CHECKED_IN = Path(__file__).with_name("asyncapi.json")

# (channel, summary, payload model, retained, action from the device's side).
_DEVICE_CHANNELS: list[tuple[str, str, type[Any], bool, str]] = [
    (
        "status",
        "Birth `online` (retained, QoS 1) on connect; the Last Will `offline` when the "
        "connection drops; `offline` with reason `agent stopped` on a clean shutdown.",
        StatusMessage,
        True,
        "send",
    ),
    (
        "telemetry",
        "Device health every `telemetry_interval_s` (30 s by default), QoS 1, via the outbox.",
        TelemetryMessage,
        False,
        "send",
    ),
    (
        "acks",
        "A command's lifecycle: accepted, running, then succeeded / failed, or rejected.",
        AckMessage,
        False,
        "send",
    ),
    (
        "results",
        "One inference result with its provenance (model, version, release, sha256, runtime), "
        "input reference and latency, via the outbox; raw input stays on the device.",
        ResultMessage,
        False,
        "send",
    ),
    ("logs", "Agent log records at or above the forward level.", LogMessage, False, "send"),
    (
        "reported",
        "What the device applied of a desired-state generation (retained).",
        ReportedState,
        True,
        "send",
    ),
    (
        "csr",
        "Certificate renewal: a CSR for a new key made on the device, sent when less than "
        "`cert_renew_fraction` of the current certificate's lifetime remains; answered on "
        "certificate.",
        CsrMessage,
        False,
        "send",
    ),
    (
        "commands",
        "A command for the device (QoS 1, to its persistent session); answered on acks.",
        CommandMessage,
        False,
        "receive",
    ),
    (
        "receipts",
        "Ids of device messages the service has committed; the outbox deletes them.",
        ReceiptMessage,
        False,
        "receive",
    ),
    (
        "desired",
        "The state the device converges to, with a generation number (retained).",
        DesiredState,
        True,
        "receive",
    ),
    (
        "certificate",
        "The answer to a csr (QoS 1 to the persistent session, not retained): the renewed "
        "certificate with its serial and expiry, or why the renewal was refused.",
        CertificateMessage,
        False,
        "receive",
    ),
]


def _schemas(model: type[Any]) -> dict[str, Any]:
    """The model's JSON schema and those of the types it nests (enums, sub-models)."""
    schema: dict[str, Any] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    nested: dict[str, Any] = schema.pop("$defs", {})
    return {model.__name__: schema, **nested}


def build_document(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """The AsyncAPI 3.0 document as a dict."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for name, summary, model, retained, action in _DEVICE_CHANNELS:
        message_name = model.__name__
        schemas.update(_schemas(model))
        messages[message_name] = {
            "name": message_name,
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{message_name}"},
        }
        parameters = {"deviceId": {"$ref": "#/components/parameters/deviceId"}}
        address = f"{prefix}/devices/{{deviceId}}/{name}"
        if name == "results":
            parameters["model"] = {"$ref": "#/components/parameters/model"}
            address += "/{model}"
        channels[name] = {
            "address": address,
            "summary": summary,
            "parameters": parameters,
            "messages": {message_name: {"$ref": f"#/components/messages/{message_name}"}},
            "bindings": {"mqtt": {"qos": 1, "retain": retained, "bindingVersion": "0.2.0"}},
        }
        verb = "publishes" if action == "send" else "receives"
        operations[f"{action}{name.capitalize()}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{name}"},
            "summary": f"A device {verb} {name}.",
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "edgefleet device protocol",
            "version": f"{SCHEMA_VERSION}.0.0",
            "description": (
                "MQTT topics between edgefleet devices and the control plane. Every device "
                "message carries schema_version, a unique message_id and a timestamp; the "
                "service stores each message id once. Devices connect with mutual TLS; the "
                "certificate's CN is the device id and the broker confines each device to "
                "its own subtree."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "fleet": {
                "host": "localhost:8883",
                "protocol": "mqtts",
                "protocolVersion": "5",
                "description": "The fleet's Mosquitto broker (mutual TLS, client cert required).",
                "security": [{"$ref": "#/components/securitySchemes/deviceCertificate"}],
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": messages,
            "parameters": {
                "deviceId": {"description": "Device id issued at enrollment (the cert's CN)."},
                "model": {"description": "The model's name, as in its signed manifest."},
            },
            "securitySchemes": {
                "deviceCertificate": {
                    "type": "X509",
                    "description": "A client certificate issued by the fleet CA at enrollment.",
                }
            },
        },
    }


def render(prefix: str = DEFAULT_PREFIX) -> str:
    """The document as stable, pretty-printed JSON."""
    return json.dumps(build_document(prefix), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
