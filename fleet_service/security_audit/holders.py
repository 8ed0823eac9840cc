"""How findings name an integration row: a site bridge as ``site:<name>`` with the sites CLI
as its fix, any other integration as ``integration:<name>`` with its REST routes."""

from __future__ import annotations

from dataclasses import dataclass

from fleet_service.sites import is_site, site_name
from fleet_service.tables import Integration

__all__ = ["IntegrationHolder", "integration_holder"]


@dataclass(frozen=True, slots=True)
class IntegrationHolder:
    """What a finding says about an integration row."""

    target: str  # "site:lab" or "integration:erp-reader"
    revoke: str  # how to revoke it
    reissue: str  # how to hand out a new bundle after revoking


def integration_holder(integration: Integration) -> IntegrationHolder:
    if is_site(integration):
        name = site_name(integration)
        return IntegrationHolder(
            target=f"site:{name}",
            revoke=f"`edgefleet sites revoke {name}`",
            # A revoked site keeps its name: the new bundle needs another one.
            reissue="`edgefleet sites create` under a new name, and install the new bundle",
        )
    return IntegrationHolder(
        target=f"integration:{integration.name}",
        revoke=f"POST /api/v1/integrations/{integration.id}/revoke",
        reissue="`edgefleet integrations create`, and hand the new bundle over",
    )
