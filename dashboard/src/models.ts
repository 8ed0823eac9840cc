// Pure helpers for the model pages: form validation, deployment rules, result series.
import { TAG_PATTERN } from "./commands";
import { parseTime } from "./format";
import type {
  DeploymentAction,
  DeploymentPublic,
  DeploymentState,
  InferenceSchedule,
  ModelReleasePublic,
  ModelRuntime,
  ResultPublic,
  ScheduleSource,
} from "./modelsApi";

/** Same rule as the manifest's: a model name is also an MQTT topic level and a directory. */
export const MODEL_NAME_PATTERN = /^[a-z0-9][a-z0-9_-]{0,62}$/;
export const MAX_VERSION_LENGTH = 64;
export const MIB = 1024 * 1024;

/** The runtime a weights file name suggests, or null. */
export function runtimeFromFileName(name: string): ModelRuntime | null {
  const lower = name.toLowerCase();
  if (lower.endsWith(".onnx")) return "onnx";
  if (lower.endsWith(".tflite")) return "tflite";
  if (lower.endsWith(".gguf")) return "gguf";
  return null;
}

/** The plaintext size of a release: the sum of its files. */
export function releaseSize(release: ModelReleasePublic): number {
  return release.files.reduce((sum, file) => sum + file.size, 0);
}

/** A number field's text: "" is `fallback`; anything else must parse and lie in [min, max]. */
export function parseNumberField(
  text: string,
  label: string,
  options: { min: number; max: number; integer?: boolean; fallback: number },
): { ok: true; value: number } | { ok: false; error: string } {
  const trimmed = text.trim();
  if (trimmed === "") return { ok: true, value: options.fallback };
  const value = Number(trimmed);
  if (!Number.isFinite(value)) return { ok: false, error: `${label} must be a number.` };
  if (options.integer && !Number.isInteger(value)) return { ok: false, error: `${label} must be a whole number.` };
  if (value < options.min || value > options.max) {
    return { ok: false, error: `${label} must be between ${options.min} and ${options.max}.` };
  }
  return { ok: true, value };
}

/** Comma- or space-separated architectures, e.g. "x86_64, aarch64". */
export function parseArchitectures(text: string): string[] {
  return text
    .split(/[\s,]+/)
    .map((a) => a.trim())
    .filter((a) => a !== "");
}

export function validateModelName(name: string): string | null {
  if (name === "") return "Give the model a name.";
  if (!MODEL_NAME_PATTERN.test(name)) {
    return "A model name is lowercase letters, digits, “-” and “_”, starting with a letter or digit (at most 63).";
  }
  return null;
}

export function validateVersion(version: string): string | null {
  if (version === "") return "Give the version, e.g. 1.0.0.";
  if (version.length > MAX_VERSION_LENGTH) return `A version is at most ${MAX_VERSION_LENGTH} characters.`;
  return null;
}

export function validateTag(tag: string): string | null {
  return TAG_PATTERN.test(tag) ? null : "Give the tag as key=value, e.g. site=lab.";
}

/** One schedule row as typed in the deploy form. */
export interface ScheduleRow {
  id: number;
  source: ScheduleSource;
  /** A path for file/folder; the command line for command; unused for http. */
  target: string;
  interval: string;
}

let nextScheduleId = 1;

export function newScheduleRow(): ScheduleRow {
  return { id: nextScheduleId++, source: "file", target: "", interval: "60" };
}

/** Splits a command line on whitespace; double quotes keep spaces together. */
export function splitCommandLine(text: string): string[] {
  const argv: string[] = [];
  const pattern = /"([^"]*)"|(\S+)/g;
  for (const match of text.matchAll(pattern)) argv.push(match[1] ?? match[2] ?? "");
  return argv;
}

export function buildSchedules(
  rows: readonly ScheduleRow[],
): { ok: true; schedules: InferenceSchedule[] } | { ok: false; error: string } {
  const schedules: InferenceSchedule[] = [];
  for (const [index, row] of rows.entries()) {
    const n = index + 1;
    const interval = parseNumberField(row.interval, `Schedule ${n}'s interval`, {
      min: 1,
      max: 86_400,
      fallback: Number.NaN,
    });
    if (!interval.ok) return interval;
    if (Number.isNaN(interval.value)) return { ok: false, error: `Schedule ${n} needs an interval in seconds.` };
    const target = row.target.trim();
    if (row.source === "file" || row.source === "folder") {
      if (target === "") return { ok: false, error: `Schedule ${n} needs the ${row.source} path on the device.` };
      schedules.push({ source: row.source, path: target, interval_s: interval.value });
    } else if (row.source === "command") {
      const argv = splitCommandLine(target);
      if (argv.length === 0) return { ok: false, error: `Schedule ${n} needs the command to run.` };
      schedules.push({ source: "command", argv, interval_s: interval.value });
    } else {
      schedules.push({ source: "http", interval_s: interval.value });
    }
  }
  return { ok: true, schedules };
}

const ACTIONS: Record<DeploymentAction, readonly DeploymentState[]> = {
  pause: ["running"],
  resume: ["paused"],
  rollback: ["running", "paused", "halted", "completed"],
};

/** Whether `action` makes sense in the deployment's current state. */
export function canAct(deployment: Pick<DeploymentPublic, "state">, action: DeploymentAction): boolean {
  return ACTIONS[action].includes(deployment.state);
}

/** A target's batch as shown: batches count from 1; 0 holds the targets that cannot take the model. */
export function displayBatch(batch: number): string {
  return batch === 0 ? "—" : String(batch);
}

/** "2 of 3", "not started (of 3)", or "all 3 done". */
export function batchLabel(d: Pick<DeploymentPublic, "current_batch" | "batch_count" | "state">): string {
  if (d.batch_count === 0) return "no batches";
  if (d.state === "completed") return `all ${d.batch_count} done`;
  if (d.current_batch === 0) return `not started (of ${d.batch_count})`;
  return `${Math.min(d.current_batch, d.batch_count)} of ${d.batch_count}`;
}

/** Adds or replaces a deployment, newest first. */
export function upsertDeployment(list: readonly DeploymentPublic[], deployment: DeploymentPublic): DeploymentPublic[] {
  const index = list.findIndex((d) => d.id === deployment.id);
  if (index !== -1) {
    const current = list[index];
    if (current && Date.parse(current.updated_at) > Date.parse(deployment.updated_at)) return [...list];
    const next = [...list];
    next[index] = deployment;
    return next;
  }
  return [deployment, ...list].sort((a, b) => Date.parse(b.created_at) - Date.parse(a.created_at));
}

/** Adds a live result to a newest-first list unless it is already there; keeps `limit`. */
export function addResult(list: readonly ResultPublic[], result: ResultPublic, limit: number): ResultPublic[] {
  if (list.some((r) => r.message_id === result.message_id && r.device_id === result.device_id)) return [...list];
  return [result, ...list]
    .sort((a, b) => (parseTime(b.timestamp) ?? 0) - (parseTime(a.timestamp) ?? 0))
    .slice(0, limit);
}

export interface ResultSeries {
  /** Unix seconds, ascending. */
  xs: number[];
  /** One entry per version (newest release last), values aligned with xs; null where another version answered. */
  versions: { version: string; latency: (number | null)[]; confidence: (number | null)[]; tokensPerS: (number | null)[] }[];
  hasConfidence: boolean;
  hasTokens: boolean;
}

/** At most this many versions get their own line; older ones are left out of the charts. */
export const MAX_CHART_VERSIONS = 4;

/** Turns results (any order) into per-version chart series on one shared time axis. */
export function buildResultSeries(results: readonly ResultPublic[]): ResultSeries {
  const timed = results
    .map((r) => ({ t: (parseTime(r.timestamp) ?? 0) / 1000, r }))
    .filter((x) => x.t > 0)
    .sort((a, b) => a.t - b.t);
  const releases = new Map<string, number>();
  for (const { r } of timed) releases.set(r.version, Math.max(releases.get(r.version) ?? 0, r.release));
  const versions = [...releases.entries()]
    .sort((a, b) => a[1] - b[1])
    .slice(-MAX_CHART_VERSIONS)
    .map(([version]) => version);
  const out: ResultSeries = {
    xs: [],
    versions: versions.map((version) => ({ version, latency: [], confidence: [], tokensPerS: [] })),
    hasConfidence: false,
    hasTokens: false,
  };
  for (const { t, r } of timed) {
    if (!versions.includes(r.version)) continue;
    // uPlot needs strictly ascending x values: nudge results that share a timestamp.
    const last = out.xs[out.xs.length - 1];
    out.xs.push(last !== undefined && t <= last ? last + 0.001 : t);
    for (const series of out.versions) {
      const mine = series.version === r.version && r.error === null;
      series.latency.push(mine ? r.latency_ms : null);
      series.confidence.push(mine ? r.confidence : null);
      series.tokensPerS.push(mine ? r.tokens_per_s : null);
    }
    if (r.confidence !== null) out.hasConfidence = true;
    if (r.tokens_per_s !== null) out.hasTokens = true;
  }
  return out;
}

/** What a result says, in one short line: the label and confidence, the text, or the error. */
export function resultOutcome(result: ResultPublic): string {
  if (result.error !== null) return result.error;
  if (result.label !== null) {
    return result.confidence === null ? result.label : `${result.label} (${(result.confidence * 100).toFixed(1)}%)`;
  }
  if (result.text !== null) return result.text;
  if (result.scores !== null) {
    const best = Object.entries(result.scores).sort((a, b) => b[1] - a[1])[0];
    if (best) return `${best[0]}: ${best[1].toFixed(3)}`;
  }
  return "";
}

/** Download progress as a 0–100 percentage, or null when the size is unknown. */
export function progressPercent(done: number | null | undefined, total: number | null | undefined): number | null {
  if (done == null || total == null || total <= 0) return null;
  return Math.min(100, Math.max(0, (done / total) * 100));
}
