// Typed client for model releases, deployments and inference results (/api/v1).
import {
  API_PREFIX,
  ApiError,
  describeDetail,
  isRecord,
  requestJson,
} from "./api";
import { clearToken, getToken } from "./auth";

export type ModelRuntime = "gguf" | "tflite" | "onnx";

export const MODEL_RUNTIMES: readonly ModelRuntime[] = ["onnx", "tflite", "gguf"];

export type FileRole = "weights" | "tokenizer" | "labels" | "config" | "other";

export interface ReleaseFile {
  name: string;
  role: FileRole;
  sha256: string;
  size: number;
}

export interface TargetConstraints {
  architectures: string[];
  min_ram_bytes: number;
  min_disk_bytes: number;
}

export interface ModelReleasePublic {
  id: string;
  name: string;
  version: string;
  runtime: ModelRuntime;
  release: number;
  files: ReleaseFile[];
  constraints: TargetConstraints;
  encrypted: boolean;
  stored_bytes: number;
  key_id: string;
  created_by: string;
  created_at: string;
  expires_at: string;
  rollback_of: string | null;
}

export type ModelPhase =
  | "pending"
  | "downloading"
  | "verifying"
  | "installing"
  | "loading"
  | "running"
  | "failed"
  | "refused";

/** One model's state as the device reports it. */
export interface ModelReport {
  name: string;
  release_id: string;
  release: number;
  version: string;
  phase: ModelPhase;
  healthy: boolean;
  detail: string | null;
  bytes_done: number;
  bytes_total: number;
  active_release: number | null;
  active_version: string | null;
  accepted_release: number;
  worker_restarts: number;
}

/** A model release the service wants on a device. */
export interface DesiredModelRef {
  name: string;
  release_id: string;
  version: string;
  release: number;
}

export type ScheduleSource = "file" | "folder" | "command" | "http";

export const SCHEDULE_SOURCES: readonly ScheduleSource[] = ["file", "folder", "command", "http"];

export interface InferenceSchedule {
  source: ScheduleSource;
  path?: string;
  argv?: string[];
  interval_s: number;
}

export type CanaryMetric = "error_rate" | "p95_latency_ms" | "mean_confidence" | "tokens_per_s";

/** The margin is in the metric's own unit. */
export const CANARY_METRICS: readonly { metric: CanaryMetric; label: string; unit: string; margin: string }[] = [
  { metric: "error_rate", label: "error rate (higher is worse)", unit: "fraction, e.g. 0.05", margin: "0.05" },
  { metric: "p95_latency_ms", label: "p95 latency (higher is worse)", unit: "ms", margin: "20" },
  { metric: "mean_confidence", label: "mean confidence (lower is worse)", unit: "0–1, e.g. 0.05", margin: "0.05" },
  { metric: "tokens_per_s", label: "tokens/s (lower is worse)", unit: "tokens/s", margin: "2" },
];

export interface CanaryGate {
  metric: CanaryMetric;
  margin: number;
  min_results: number;
}

/** The gate's settings and where it stands. */
export interface CanaryPublic extends CanaryGate {
  verdict: "waiting" | "passed" | "failed" | null;
  baseline: number | null;
  candidate: number | null;
  baseline_results: number;
  candidate_results: number;
}

export interface DeploymentCreate {
  release_id: string;
  device_ids?: string[];
  tag?: string;
  batch_size: number;
  pause_s: number;
  max_failure_ratio: number;
  canary?: CanaryGate;
  schedules?: InferenceSchedule[];
}

export interface DeploymentPreview {
  release_id: string;
  compatible: string[];
  incompatible: { device_id: string; reasons: string[] }[];
}

export type DeploymentState = "running" | "paused" | "halted" | "completed" | "rolled_back";

export type TargetState = "waiting" | "incompatible" | "sent" | "running" | "failed" | "rolled_back";

export interface DeploymentTarget {
  device_id: string;
  /** From 1; 0 for targets that cannot take the release (state "incompatible"). */
  batch: number;
  state: TargetState;
  detail: string | null;
  previous_release_id: string | null;
  phase: ModelPhase | null;
  bytes_done: number;
  bytes_total: number;
  updated_at: string;
}

export interface DeploymentPublic {
  id: string;
  release_id: string;
  model_name: string;
  version: string;
  release: number;
  target_tag: string | null;
  state: DeploymentState;
  /** The last batch sent, from 1; 0 before the first. */
  current_batch: number;
  batch_count: number;
  batch_size: number;
  pause_s: number;
  max_failure_ratio: number;
  canary: CanaryPublic | null;
  schedules: InferenceSchedule[];
  detail: string | null;
  /** When the rollout sends its next batch, if one is due. */
  next_batch_at: string | null;
  created_by: string;
  created_at: string;
  updated_at: string;
  targets: DeploymentTarget[];
}

export type DeploymentAction = "pause" | "resume" | "rollback";

export type ResultSource = "command" | "schedule" | "api";

export interface ResultPublic {
  device_id: string;
  message_id: string;
  timestamp: string;
  received_at: string;
  model: string;
  version: string;
  release: number;
  sha256: string;
  runtime: ModelRuntime;
  source: ResultSource;
  input_ref: string | null;
  latency_ms: number;
  label: string | null;
  confidence: number | null;
  scores: Record<string, number> | null;
  text: string | null;
  tokens: number | null;
  tokens_per_s: number | null;
  error: string | null;
}

export interface ResultSummary {
  model: string;
  version: string;
  count: number;
  errors: number;
  error_rate: number;
  p50_latency_ms: number | null;
  p95_latency_ms: number | null;
  mean_confidence: number | null;
  mean_tokens_per_s: number | null;
}

export interface ResultQuery {
  model?: string;
  deviceId?: string;
  limit?: number;
}

function query(params: Record<string, string | number | undefined>): string {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== "") search.set(key, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

const JSON_HEADERS = { "Content-Type": "application/json" };

/** Model releases, newest first; only those named `name` when given. */
export function listModels(name?: string, signal?: AbortSignal): Promise<ModelReleasePublic[]> {
  return requestJson<ModelReleasePublic[]>(`/models${query({ name })}`, { signal });
}

export function getModel(releaseId: string, signal?: AbortSignal): Promise<ModelReleasePublic> {
  return requestJson<ModelReleasePublic>(`/models/${encodeURIComponent(releaseId)}`, { signal });
}

/** The upload form's content; sizes in bytes, files as picked. */
export interface ModelUpload {
  weights: File;
  name: string;
  version: string;
  runtime: ModelRuntime;
  tokenizer?: File | undefined;
  labels?: File | undefined;
  config?: File | undefined;
  architectures: string[];
  minRamBytes: number;
  minDiskBytes: number;
  expiresInDays: number;
  encrypt: boolean;
}

export interface UploadProgress {
  loaded: number;
  total: number;
}

function problemFromXhr(xhr: XMLHttpRequest): ApiError {
  let title = xhr.statusText || `HTTP ${xhr.status}`;
  let detail: string | null = null;
  try {
    const body: unknown = JSON.parse(xhr.responseText);
    if (isRecord(body)) {
      if (typeof body.title === "string" && body.title) title = body.title;
      detail = describeDetail(body.detail);
    }
  } catch {
    // Not JSON (e.g. a proxy's 413 page): fall back to the status line.
  }
  if (detail === null && xhr.status === 413) detail = "The file is larger than the service accepts.";
  return new ApiError(xhr.status, title, detail ?? `${title} (HTTP ${xhr.status})`);
}

/**
 * POST /models as multipart. XMLHttpRequest rather than fetch: only it reports upload progress.
 * Rejects with ApiError (problem JSON), or a DOMException "AbortError" when `signal` aborts.
 */
export function uploadModel(
  upload: ModelUpload,
  onProgress: (progress: UploadProgress) => void,
  signal?: AbortSignal,
): Promise<ModelReleasePublic> {
  const form = new FormData();
  form.set("name", upload.name);
  form.set("version", upload.version);
  form.set("runtime", upload.runtime);
  if (upload.architectures.length > 0) form.set("architectures", upload.architectures.join(","));
  form.set("min_ram_bytes", String(upload.minRamBytes));
  form.set("min_disk_bytes", String(upload.minDiskBytes));
  form.set("expires_in_days", String(upload.expiresInDays));
  form.set("encrypt", upload.encrypt ? "true" : "false");
  form.set("weights", upload.weights, upload.weights.name);
  for (const role of ["tokenizer", "labels", "config"] as const) {
    const file = upload[role];
    if (file) form.set(role, file, file.name);
  }

  return new Promise<ModelReleasePublic>((resolve, reject) => {
    const token = getToken();
    if (token === null) {
      reject(new ApiError(401, "Unauthorized", "You are not signed in."));
      return;
    }
    const xhr = new XMLHttpRequest();
    const abort = (): void => xhr.abort();
    const cleanup = (): void => signal?.removeEventListener("abort", abort);
    xhr.open("POST", `${API_PREFIX}/models`);
    xhr.setRequestHeader("Authorization", `Bearer ${token}`);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress({ loaded: event.loaded, total: event.total });
    });
    xhr.addEventListener("load", () => {
      cleanup();
      if (xhr.status >= 200 && xhr.status < 300) {
        try {
          resolve(JSON.parse(xhr.responseText) as ModelReleasePublic);
        } catch {
          reject(new ApiError(xhr.status, "Bad answer", "The service answered the upload with something unreadable."));
        }
        return;
      }
      const error = problemFromXhr(xhr);
      if (xhr.status === 401) clearToken("expired");
      reject(error);
    });
    xhr.addEventListener("error", () => {
      cleanup();
      reject(new ApiError(0, "Network error", "The upload was cut off. Is the service running?"));
    });
    xhr.addEventListener("abort", () => {
      cleanup();
      reject(new DOMException("The upload was cancelled.", "AbortError"));
    });
    signal?.addEventListener("abort", abort);
    xhr.send(form);
  });
}

export function previewDeployment(body: DeploymentCreate, signal?: AbortSignal): Promise<DeploymentPreview> {
  return requestJson<DeploymentPreview>("/deployments/preview", {
    method: "POST",
    body: JSON.stringify(body),
    headers: JSON_HEADERS,
    signal,
  });
}

export function createDeployment(body: DeploymentCreate, signal?: AbortSignal): Promise<DeploymentPublic> {
  return requestJson<DeploymentPublic>("/deployments", {
    method: "POST",
    body: JSON.stringify(body),
    headers: JSON_HEADERS,
    signal,
  });
}

export function listDeployments(signal?: AbortSignal): Promise<DeploymentPublic[]> {
  return requestJson<DeploymentPublic[]>("/deployments", { signal });
}

export function getDeployment(id: string, signal?: AbortSignal): Promise<DeploymentPublic> {
  return requestJson<DeploymentPublic>(`/deployments/${encodeURIComponent(id)}`, { signal });
}

export function actOnDeployment(id: string, action: DeploymentAction, signal?: AbortSignal): Promise<DeploymentPublic> {
  return requestJson<DeploymentPublic>(`/deployments/${encodeURIComponent(id)}/${action}`, {
    method: "POST",
    signal,
  });
}

/** Results, newest first. */
export function listResults(q: ResultQuery, signal?: AbortSignal): Promise<ResultPublic[]> {
  return requestJson<ResultPublic[]>(
    `/results${query({ model: q.model, device_id: q.deviceId, limit: q.limit })}`,
    { signal },
  );
}

/** One summary row per (model, version). */
export function getResultSummary(q: ResultQuery, signal?: AbortSignal): Promise<ResultSummary[]> {
  return requestJson<ResultSummary[]>(`/results/summary${query({ model: q.model, device_id: q.deviceId })}`, {
    signal,
  });
}

/** Minimal structural check for `deployment` events. */
export function isDeploymentPublic(value: unknown): value is DeploymentPublic {
  return (
    isRecord(value) &&
    typeof value.id === "string" &&
    typeof value.release_id === "string" &&
    typeof value.state === "string" &&
    Array.isArray(value.targets)
  );
}

/** Minimal structural check for `result` events. */
export function isResultPublic(value: unknown): value is ResultPublic {
  return (
    isRecord(value) &&
    typeof value.device_id === "string" &&
    typeof value.message_id === "string" &&
    typeof value.model === "string" &&
    typeof value.version === "string" &&
    typeof value.timestamp === "string" &&
    typeof value.latency_ms === "number"
  );
}

