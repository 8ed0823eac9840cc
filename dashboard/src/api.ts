// Typed client for the edgefleet REST API (/api/v1) and its Server-Sent Events stream.
import { clearToken, getToken, refreshSession, setSession } from "./auth";
import type { DesiredModelRef, ModelReport } from "./modelsApi";
import { SseParser, type SseMessage } from "./sse";

export const API_PREFIX = "/api/v1";

export type DeviceStatus = "online" | "offline" | "unknown";

export interface TelemetryPoint {
  timestamp: string;
  cpu_percent: number;
  memory_percent: number;
  memory_used_bytes: number;
  memory_total_bytes: number;
  disk_percent: number;
  load_1: number;
  temperature_c: number | null;
  net_bytes_sent: number;
  net_bytes_recv: number;
  uptime_s: number;
  /** Set on hourly points (ranges over two days): samples in the hour, values are its means. */
  samples?: number | null;
}

export interface DevicePublic {
  id: string;
  hostname: string;
  tags: Record<string, string>;
  status: DeviceStatus;
  last_seen: string | null;
  enrolled_at: string;
  agent_version: string | null;
  telemetry: TelemetryPoint | null;
  /** Generation of the desired state the service holds for the device (0: never set). */
  desired_generation: number;
  /** Generation the device last reported, or null before its first report. */
  reported_generation: number | null;
  reported_applied: boolean | null;
  reported_detail: string | null;
  /** The device's own account of each model it was told to run, by model name. */
  models?: Record<string, ModelReport>;
  /** The model releases the service wants on the device. */
  desired_models?: DesiredModelRef[];
}

/** A command parameter or result value: JSON scalars only. */
export type Scalar = string | number | boolean | null;

export type CommandStatus =
  | "pending"
  | "accepted"
  | "running"
  | "succeeded"
  | "failed"
  | "rejected"
  | "expired"
  | "dropped";

export const COMMAND_STATUSES: readonly CommandStatus[] = [
  "pending",
  "accepted",
  "running",
  "succeeded",
  "failed",
  "rejected",
  "expired",
  "dropped",
];

export interface CommandPublic {
  id: string;
  device_id: string;
  type: string;
  params: Record<string, Scalar>;
  status: CommandStatus;
  detail: string | null;
  result: Record<string, Scalar> | null;
  issued_at: string;
  expires_at: string;
  updated_at: string;
  issued_by: string;
}

export interface CommandCreate {
  type: string;
  params: Record<string, Scalar>;
  expires_in_s?: number;
}

export interface CommandBroadcast extends CommandCreate {
  /** "key=value": every device carrying this tag gets the command. */
  tag: string;
}

export type LogLevel = "DEBUG" | "INFO" | "WARNING" | "ERROR" | "CRITICAL";

export const LOG_LEVELS: readonly LogLevel[] = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"];

export interface LogRecordPublic {
  device_id: string;
  message_id: string;
  timestamp: string;
  level: LogLevel;
  logger: string;
  message: string;
}

export interface LogQuery {
  /** At or above this level. */
  level?: LogLevel;
  q?: string;
  limit?: number;
}

export interface RuntimeConfig {
  telemetry_interval_s: number | null;
  log_level: LogLevel | null;
  log_forward_level: LogLevel | null;
}

export interface DesiredPublic {
  generation: number;
  config: RuntimeConfig;
  updated_at: string | null;
}

export interface TokenResponse {
  access_token: string;
  token_type: string;
  /** Seconds the access token lives (short: the refresh token renews it). */
  expires_in: number;
  /** One-use token for POST /auth/refresh; each refresh returns a new one. */
  refresh_token: string;
  /** Seconds until the login session ends, however often it is refreshed. */
  refresh_expires_in: number;
  username: string;
  role: "admin" | "operator" | "viewer";
}

export interface TelemetryQuery {
  since?: Date;
  until?: Date;
  limit?: number;
}

/** An API failure; `detail` is the human-readable message to show. */
export class ApiError extends Error {
  readonly status: number;
  readonly title: string;
  readonly detail: string;

  constructor(status: number, title: string, detail: string) {
    super(detail);
    this.name = "ApiError";
    this.status = status;
    this.title = title;
    this.detail = detail;
  }
}

export function errorMessage(err: unknown): string {
  if (err instanceof ApiError) return err.detail;
  if (err instanceof Error && err.message) return err.message;
  return "Something went wrong.";
}

export function isAbortError(err: unknown): boolean {
  return err instanceof DOMException && err.name === "AbortError";
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Turns a problem+json body (or FastAPI's validation list) into one readable line. */
export function describeDetail(detail: unknown): string | null {
  if (typeof detail === "string" && detail.trim() !== "") return detail;
  if (Array.isArray(detail)) {
    const parts = detail
      .map((item: unknown) => (isRecord(item) && typeof item.msg === "string" ? item.msg : null))
      .filter((msg): msg is string => msg !== null);
    if (parts.length > 0) return parts.join("; ");
  }
  return null;
}

export async function problemFromResponse(response: Response): Promise<ApiError> {
  let title = response.statusText || `HTTP ${response.status}`;
  let detail: string | null = null;
  try {
    const body: unknown = await response.json();
    if (isRecord(body)) {
      if (typeof body.title === "string" && body.title) title = body.title;
      detail = describeDetail(body.detail);
    }
  } catch {
    // Not JSON (e.g. a proxy error page): fall back to the status line.
  }
  return new ApiError(response.status, title, detail ?? `${title} (HTTP ${response.status})`);
}

export interface RequestOptions {
  method?: string;
  body?: BodyInit;
  headers?: Record<string, string>;
  signal?: AbortSignal | undefined;
  /** Send the bearer token and treat 401 as "session over" (default true). */
  auth?: boolean;
}

async function send(path: string, options: RequestOptions, retried = false): Promise<Response> {
  const { auth = true } = options;
  const headers: Record<string, string> = { Accept: "application/json", ...options.headers };
  if (auth) {
    const token = getToken();
    if (token === null) {
      throw new ApiError(401, "Unauthorized", "You are not signed in.");
    }
    headers.Authorization = `Bearer ${token}`;
  }
  let response: Response;
  try {
    response = await fetch(API_PREFIX + path, {
      method: options.method ?? "GET",
      headers,
      body: options.body ?? null,
      signal: options.signal ?? null,
      cache: "no-store",
      credentials: "same-origin",
    });
  } catch (err) {
    if (isAbortError(err)) throw err;
    throw new ApiError(0, "Network error", "Cannot reach the edgefleet service. Is it running?");
  }
  if (auth && response.status === 401 && !retried && !(options.body instanceof ReadableStream)) {
    // The access token expired or was refused: renew it once and try again.
    if (await refreshSession()) return send(path, options, true);
  }
  if (!response.ok) {
    const error = await problemFromResponse(response);
    if (auth && response.status === 401) clearToken("expired");
    throw error;
  }
  return response;
}

export async function requestJson<T>(path: string, options: RequestOptions = {}): Promise<T> {
  const response = await send(path, options);
  // The shapes are the server's contract (see the OpenAPI document); they are not re-validated here.
  return (await response.json()) as T;
}

export async function login(
  username: string,
  password: string,
  signal?: AbortSignal,
): Promise<TokenResponse> {
  const form = new URLSearchParams({ grant_type: "password", username, password });
  const tokens = await requestJson<TokenResponse>("/auth/token", {
    method: "POST",
    body: form,
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    signal,
    auth: false,
  });
  // The whole session (with its refresh token) is kept here; the caller's setToken with the same
  // access token leaves it as it is.
  setSession(tokens);
  return tokens;
}

/** Who the session belongs to, with role and tag (null unless a tag-scoped token). */
export interface Me {
  name: string;
  kind: "user" | "token" | "oidc" | "cli" | "system";
  role: "admin" | "operator" | "viewer";
  tag: string | null;
}

export function getMe(signal?: AbortSignal): Promise<Me> {
  return requestJson<Me>("/auth/me", { signal });
}

export function listDevices(signal?: AbortSignal): Promise<DevicePublic[]> {
  return requestJson<DevicePublic[]>("/devices", { signal });
}

export function getDevice(id: string, signal?: AbortSignal): Promise<DevicePublic> {
  return requestJson<DevicePublic>(`/devices/${encodeURIComponent(id)}`, { signal });
}

export function getTelemetry(
  id: string,
  query: TelemetryQuery,
  signal?: AbortSignal,
): Promise<TelemetryPoint[]> {
  const params = new URLSearchParams();
  if (query.since) params.set("since", query.since.toISOString());
  if (query.until) params.set("until", query.until.toISOString());
  if (query.limit !== undefined) params.set("limit", String(query.limit));
  const qs = params.toString();
  return requestJson<TelemetryPoint[]>(
    `/devices/${encodeURIComponent(id)}/telemetry${qs ? `?${qs}` : ""}`,
    { signal },
  );
}

export function sendCommand(
  deviceId: string,
  command: CommandCreate,
  signal?: AbortSignal,
): Promise<CommandPublic> {
  return requestJson<CommandPublic>(`/devices/${encodeURIComponent(deviceId)}/commands`, {
    method: "POST",
    body: JSON.stringify(command),
    headers: { "Content-Type": "application/json" },
    signal,
  });
}

/** Sends one command to every device carrying `command.tag`; one answer per device. */
export function sendCommandToTag(command: CommandBroadcast, signal?: AbortSignal): Promise<CommandPublic[]> {
  return requestJson<CommandPublic[]>("/commands", {
    method: "POST",
    body: JSON.stringify(command),
    headers: { "Content-Type": "application/json" },
    signal,
  });
}

/** A device's commands, newest first. */
export function listCommands(deviceId: string, limit: number, signal?: AbortSignal): Promise<CommandPublic[]> {
  const params = new URLSearchParams({ device_id: deviceId, limit: String(limit) });
  return requestJson<CommandPublic[]>(`/commands?${params.toString()}`, { signal });
}

/** A device's stored log records, oldest first. */
export function getLogs(deviceId: string, query: LogQuery, signal?: AbortSignal): Promise<LogRecordPublic[]> {
  const params = new URLSearchParams();
  if (query.level) params.set("level", query.level);
  if (query.q) params.set("q", query.q);
  if (query.limit !== undefined) params.set("limit", String(query.limit));
  const qs = params.toString();
  return requestJson<LogRecordPublic[]>(`/devices/${encodeURIComponent(deviceId)}/logs${qs ? `?${qs}` : ""}`, {
    signal,
  });
}

export function getDesired(deviceId: string, signal?: AbortSignal): Promise<DesiredPublic> {
  return requestJson<DesiredPublic>(`/devices/${encodeURIComponent(deviceId)}/desired`, { signal });
}

export function putDesired(deviceId: string, config: RuntimeConfig, signal?: AbortSignal): Promise<DesiredPublic> {
  return requestJson<DesiredPublic>(`/devices/${encodeURIComponent(deviceId)}/desired`, {
    method: "PUT",
    body: JSON.stringify({ config }),
    headers: { "Content-Type": "application/json" },
    signal,
  });
}

/** Minimal structural check for `device` events before they reach the UI. */
export function isDevicePublic(value: unknown): value is DevicePublic {
  return (
    isRecord(value) &&
    typeof value.id === "string" &&
    typeof value.hostname === "string" &&
    (value.status === "online" || value.status === "offline" || value.status === "unknown") &&
    isRecord(value.tags) &&
    (value.telemetry === null || isRecord(value.telemetry))
  );
}

/** Minimal structural check for `command` events. */
export function isCommandPublic(value: unknown): value is CommandPublic {
  return (
    isRecord(value) &&
    typeof value.id === "string" &&
    typeof value.device_id === "string" &&
    typeof value.type === "string" &&
    typeof value.status === "string" &&
    (COMMAND_STATUSES as readonly string[]).includes(value.status) &&
    typeof value.issued_at === "string" &&
    typeof value.updated_at === "string" &&
    (value.result === null || value.result === undefined || isRecord(value.result))
  );
}

/** Minimal structural check for `log` events. */
export function isLogRecordPublic(value: unknown): value is LogRecordPublic {
  return (
    isRecord(value) &&
    typeof value.device_id === "string" &&
    typeof value.message_id === "string" &&
    typeof value.timestamp === "string" &&
    typeof value.level === "string" &&
    (LOG_LEVELS as readonly string[]).includes(value.level) &&
    typeof value.logger === "string" &&
    typeof value.message === "string"
  );
}

export interface EventStreamOptions {
  signal: AbortSignal;
  /** Called once the server has accepted the stream. */
  onOpen: () => void;
  onMessage: (message: SseMessage) => void;
  /** Abort when nothing (not even a ": ping") arrives for this long. */
  idleTimeoutMs?: number;
}

export class StreamIdleError extends Error {
  constructor() {
    super("The event stream went quiet.");
    this.name = "StreamIdleError";
  }
}

/**
 * Reads GET /api/v1/events until the server closes it (resolves) or it fails (rejects).
 * EventSource cannot send an Authorization header, so this uses fetch and parses frames itself.
 */
export async function streamEvents(options: EventStreamOptions): Promise<{ retryMs: number | null }> {
  const { signal, onOpen, onMessage, idleTimeoutMs = 60_000 } = options;
  const local = new AbortController();
  const forward = (): void => local.abort();
  signal.addEventListener("abort", forward);
  let idle = false;
  let idleTimer: ReturnType<typeof setTimeout> | undefined;
  const touch = (): void => {
    if (idleTimer !== undefined) clearTimeout(idleTimer);
    idleTimer = setTimeout(() => {
      idle = true;
      local.abort();
    }, idleTimeoutMs);
  };

  const parser = new SseParser();
  try {
    touch();
    const response = await send("/events", {
      headers: { Accept: "text/event-stream" },
      signal: local.signal,
    });
    if (!response.body) throw new Error("The event stream has no body.");
    onOpen();
    touch();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      touch();
      for (const message of parser.push(value)) onMessage(message);
    }
    return { retryMs: parser.retryMs };
  } catch (err) {
    if (idle && !signal.aborted) throw new StreamIdleError();
    throw err;
  } finally {
    if (idleTimer !== undefined) clearTimeout(idleTimer);
    signal.removeEventListener("abort", forward);
  }
}
