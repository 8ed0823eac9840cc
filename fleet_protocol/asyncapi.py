"""Generate the AsyncAPI 3 document of the topic contract from the payload models.

``python -m fleet_protocol.asyncapi > fleet_protocol/asyncapi.json`` (``make asyncapi``)
rewrites the checked-in copy; a test fails when that copy is stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fleet_protocol.messages import SCHEMA_VERSION, StatusMessage, TelemetryMessage
from fleet_protocol.topics import DEFAULT_PREFIX

__all__ = ["CHECKED_IN", "build_document", "render"]

CHECKED_IN = Path(__file__).with_name("asyncapi.json")

# (channel, summary, payload model, retained); the direction is from the device's side.
_DEVICE_CHANNELS: list[tuple[str, str, type[Any], bool]] = [
    (
        "status",
        "Birth `online` (retained, QoS 1) on connect; the Last Will `offline` when the "
        "connection drops; `offline` with reason `agent stopped` on a clean shutdown.",
        StatusMessage,
        True,
    ),
    (
        "telemetry",
        "Device health every `telemetry_interval_s` (30 s by default), QoS 1.",
        TelemetryMessage,
        False,
    ),
]


def _schema(model: type[Any]) -> dict[str, Any]:
    schema: dict[str, Any] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return schema


def build_document(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """The AsyncAPI 3.0 document as a dict."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for name, summary, model, retained in _DEVICE_CHANNELS:
        message_name = model.__name__
        schemas[message_name] = _schema(model)
        messages[message_name] = {
            "name": message_name,
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{message_name}"},
        }
        channels[name] = {
            "address": f"{prefix}/devices/{{deviceId}}/{name}",
            "summary": summary,
            "parameters": {"deviceId": {"$ref": "#/components/parameters/deviceId"}},
            "messages": {message_name: {"$ref": f"#/components/messages/{message_name}"}},
            "bindings": {"mqtt": {"qos": 1, "retain": retained, "bindingVersion": "0.2.0"}},
        }
        operations[f"publish{name.capitalize()}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{name}"},
            "summary": f"A device publishes its {name}.",
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
                "deviceId": {"description": "Device id issued at enrollment (the cert's CN)."}
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
