// Typed client for access management and third-party access: users, API tokens, the audit log,
// integrations, webhooks, security findings and device revocation (all admin routes).
import { requestJson, type DevicePublic, type Me } from "./api";

export type Role = Me["role"];

export const ROLES: readonly Role[] = ["viewer", "operator", "admin"];

/** A device as the service answers it, with the identity fields of issue 6. */
export type DeviceWithIdentity = DevicePublic & {
  /** When its identity was revoked (it can no longer connect or re-enroll), or null. */
  revoked_at?: string | null;
};

export interface UserPublic {
  username: string;
  role: Role;
  created_at: string;
  last_login_at: string | null;
  disabled: boolean;
}

export interface UserCreate {
  username: string;
  role: Role;
  /** Omitted: the service generates one and returns it once. */
  password?: string;
}

export interface UserCreated {
  user: UserPublic;
  password: string;
}

export interface UserUpdate {
  role?: Role;
  disabled?: boolean;
  password?: string;
}

export type TokenState = "active" | "expired" | "revoked";

export interface ApiTokenPublic {
  id: string;
  name: string;
  role: Role;
  tag: string | null;
  created_by: string;
  created_at: string;
  expires_at: string;
  last_used_at: string | null;
  revoked_at: string | null;
  state: TokenState;
}

export interface ApiTokenCreate {
  name: string;
  role: Role;
  tag?: string;
  /** A duration such as "90d" or "12h". */
  expires_in: string;
}

export interface ApiTokenCreated {
  token: ApiTokenPublic;
  secret: string;
}

export type AuditOutcome = "success" | "denied" | "failed";

export const AUDIT_OUTCOMES: readonly AuditOutcome[] = ["success", "denied", "failed"];

export interface AuditEventPublic {
  id: number;
  at: string;
  actor: string;
  actor_kind: string;
  role: string | null;
  action: string;
  target: string | null;
  address: string | null;
  outcome: AuditOutcome;
  detail: Record<string, unknown> | null;
}

export interface AuditQuery {
  actor?: string;
  /** Exact, or a prefix ending in "*" ("user.*"). */
  action?: string;
  target?: string;
  outcome?: AuditOutcome;
  since?: string;
  until?: string;
  limit?: number;
}

export type ReadKind = "results" | "telemetry" | "status";

export const READ_KINDS: readonly ReadKind[] = ["results", "telemetry", "status"];

export interface IntegrationPublic {
  id: string;
  name: string;
  identity: string;
  read: string[];
  tag: string | null;
  cert_not_after: string;
  created_by: string;
  created_at: string;
  revoked_at: string | null;
}

export interface IntegrationCreate {
  name: string;
  read: ReadKind[];
  tag?: string;
}

export interface IntegrationBundle {
  cert_pem: string;
  key_pem: string;
  ca_pem: string;
  broker_host: string;
  broker_port: number;
  topics: string[];
  mosquitto_sub: string;
}

export interface IntegrationCreated {
  integration: IntegrationPublic;
  bundle: IntegrationBundle;
}

export interface WebhookPublic {
  id: string;
  name: string;
  url: string;
  models: string[];
  tag: string | null;
  created_by: string;
  created_at: string;
  disabled_at: string | null;
  enabled: boolean;
}

export interface WebhookCreate {
  name: string;
  url: string;
  models?: string[];
  tag?: string;
}

export interface WebhookCreated {
  webhook: WebhookPublic;
  secret: string;
}

export type DeliveryState = "pending" | "delivered" | "failed" | "cancelled";

export interface DeliveryPublic {
  id: number;
  message_id: string;
  state: DeliveryState;
  attempts: number;
  last_status: number | null;
  last_error: string | null;
  next_attempt_at: string | null;
  created_at: string;
  delivered_at: string | null;
}

export type Severity = "high" | "medium" | "low";

export interface SecurityFinding {
  kind: string;
  severity: Severity;
  target: string;
  detail: string;
  fix: string;
}

export interface SecurityFindings {
  generated_at: string;
  findings: SecurityFinding[];
}

function post<T>(path: string, body: unknown, signal?: AbortSignal): Promise<T> {
  return requestJson<T>(path, {
    method: "POST",
    body: body === undefined ? undefined : JSON.stringify(body),
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    signal,
  });
}

const id = encodeURIComponent;

// --- users -----------------------------------------------------------------------------------

export function listUsers(signal?: AbortSignal): Promise<UserPublic[]> {
  return requestJson<UserPublic[]>("/users", { signal });
}

export function createUser(body: UserCreate): Promise<UserCreated> {
  return post<UserCreated>("/users", body);
}

export function updateUser(username: string, body: UserUpdate): Promise<UserPublic> {
  return requestJson<UserPublic>(`/users/${id(username)}`, {
    method: "PATCH",
    body: JSON.stringify(body),
    headers: { "Content-Type": "application/json" },
  });
}

// --- API tokens ------------------------------------------------------------------------------

export function listTokens(signal?: AbortSignal): Promise<ApiTokenPublic[]> {
  return requestJson<ApiTokenPublic[]>("/tokens", { signal });
}

export function createToken(body: ApiTokenCreate): Promise<ApiTokenCreated> {
  return post<ApiTokenCreated>("/tokens", body);
}

export function revokeToken(tokenId: string): Promise<ApiTokenPublic> {
  return post<ApiTokenPublic>(`/tokens/${id(tokenId)}/revoke`, undefined);
}

// --- audit log -------------------------------------------------------------------------------

export async function listAudit(query: AuditQuery, signal?: AbortSignal): Promise<AuditEventPublic[]> {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value !== undefined && value !== "") params.set(key, String(value));
  }
  const qs = params.toString();
  const log = await requestJson<{ events: AuditEventPublic[] }>(`/audit${qs ? `?${qs}` : ""}`, { signal });
  return log.events;
}

// --- integrations ----------------------------------------------------------------------------

export function listIntegrations(signal?: AbortSignal): Promise<IntegrationPublic[]> {
  return requestJson<IntegrationPublic[]>("/integrations", { signal });
}

export function createIntegration(body: IntegrationCreate): Promise<IntegrationCreated> {
  return post<IntegrationCreated>("/integrations", body);
}

export function revokeIntegration(integrationId: string): Promise<IntegrationPublic> {
  return post<IntegrationPublic>(`/integrations/${id(integrationId)}/revoke`, undefined);
}

// --- webhooks --------------------------------------------------------------------------------

export function listWebhooks(signal?: AbortSignal): Promise<WebhookPublic[]> {
  return requestJson<WebhookPublic[]>("/webhooks", { signal });
}

export function createWebhook(body: WebhookCreate): Promise<WebhookCreated> {
  return post<WebhookCreated>("/webhooks", body);
}

export function disableWebhook(webhookId: string): Promise<WebhookPublic> {
  return post<WebhookPublic>(`/webhooks/${id(webhookId)}/disable`, undefined);
}

export async function listDeliveries(webhookId: string, limit: number, signal?: AbortSignal): Promise<DeliveryPublic[]> {
  const log = await requestJson<{ deliveries: DeliveryPublic[] }>(
    `/webhooks/${id(webhookId)}/deliveries?limit=${limit}`,
    { signal },
  );
  return log.deliveries;
}

// --- security findings -----------------------------------------------------------------------

export function getFindings(signal?: AbortSignal): Promise<SecurityFindings> {
  return requestJson<SecurityFindings>("/security/findings", { signal });
}

// --- device identity -------------------------------------------------------------------------

/** Revoke a device's identity: CRL, broker session dropped, device token void; history kept. */
export function revokeDevice(deviceId: string, reason: string | null): Promise<DeviceWithIdentity> {
  return post<DeviceWithIdentity>(`/devices/${id(deviceId)}/revoke`, reason ? { reason } : {});
}
