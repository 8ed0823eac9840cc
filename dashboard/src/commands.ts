// Pure helpers for composing commands and keeping a command list in sync with live events.
import type { CommandPublic, CommandStatus, Scalar } from "./api";

export interface CommandTypeInfo {
  type: string;
  label: string;
  /** Parameter names the agent understands, offered as suggestions. */
  paramKeys: readonly string[];
}

export const COMMAND_TYPES: readonly CommandTypeInfo[] = [
  { type: "ping", label: "ping", paramKeys: [] },
  { type: "set-config", label: "set-config", paramKeys: ["telemetry_interval_s", "log_level", "log_forward_level"] },
  { type: "collect-logs", label: "collect-logs", paramKeys: ["lines"] },
  { type: "restart-agent", label: "restart-agent", paramKeys: [] },
  // `input`: a prompt for GGUF models, a JSON array (or {name: array}) for ONNX/TFLite tensors.
  { type: "infer", label: "infer", paramKeys: ["model", "input"] },
];

export interface ExpiryOption {
  seconds: number;
  label: string;
}

export const EXPIRY_OPTIONS: readonly ExpiryOption[] = [
  { seconds: 60, label: "1 min" },
  { seconds: 300, label: "5 min" },
  { seconds: 3600, label: "1 h" },
];

export const DEFAULT_EXPIRY_S = 300;
export const MAX_PARAMS = 64;

export interface ParamRow {
  /** Stable React key; not sent. */
  id: number;
  key: string;
  value: string;
}

export interface CommandDraft {
  type: string;
  params: ParamRow[];
  expiresInS: number;
}

let nextRowId = 1;

export function newParamRow(key = "", value = ""): ParamRow {
  return { id: nextRowId++, key, value };
}

export function emptyDraft(): CommandDraft {
  return { type: COMMAND_TYPES[0]?.type ?? "ping", params: [], expiresInS: DEFAULT_EXPIRY_S };
}

export function paramKeysFor(type: string): readonly string[] {
  return COMMAND_TYPES.find((t) => t.type === type)?.paramKeys ?? [];
}

/**
 * A typed value as an operator writes it: JSON scalars (`5`, `2.5`, `true`, `null`, `"5"`)
 * are parsed; anything else (`INFO`, empty) is sent as text.
 */
export function parseParamValue(raw: string): Scalar {
  const text = raw.trim();
  if (text === "") return "";
  try {
    const parsed: unknown = JSON.parse(text);
    if (parsed === null || typeof parsed === "string" || typeof parsed === "boolean") return parsed;
    if (typeof parsed === "number" && Number.isFinite(parsed)) return parsed;
  } catch {
    // not JSON: plain text
  }
  return raw;
}

export type ParamsResult = { ok: true; params: Record<string, Scalar> } | { ok: false; error: string };

/** Turns the form rows into the request's `params`; rows with neither key nor value are skipped. */
export function buildParams(rows: readonly ParamRow[]): ParamsResult {
  const params: Record<string, Scalar> = {};
  let count = 0;
  for (const row of rows) {
    const key = row.key.trim();
    if (key === "" && row.value.trim() === "") continue;
    if (key === "") return { ok: false, error: `The parameter with value “${row.value}” has no name.` };
    if (Object.hasOwn(params, key)) return { ok: false, error: `The parameter “${key}” is given twice.` };
    params[key] = parseParamValue(row.value);
    count += 1;
  }
  if (count > MAX_PARAMS) return { ok: false, error: `At most ${MAX_PARAMS} parameters are allowed.` };
  return { ok: true, params };
}

/** A `key=value` tag as the broadcast endpoint expects it. */
export const TAG_PATTERN = /^[A-Za-z0-9_.-]+=.*$/;

const FINAL: ReadonlySet<CommandStatus> = new Set(["succeeded", "failed", "rejected", "expired", "dropped"]);

export function isFinalStatus(status: CommandStatus): boolean {
  return FINAL.has(status);
}

function newestFirst(a: CommandPublic, b: CommandPublic): number {
  return Date.parse(b.issued_at) - Date.parse(a.issued_at) || b.id.localeCompare(a.id);
}

/**
 * Adds or replaces a command, newest first, capped at `limit`. An older update (by
 * `updated_at`) never overwrites a newer one, so out-of-order events cannot undo a final status.
 */
export function upsertCommand(
  commands: readonly CommandPublic[],
  command: CommandPublic,
  limit: number,
): CommandPublic[] {
  const index = commands.findIndex((c) => c.id === command.id);
  if (index !== -1) {
    const current = commands[index];
    if (current && Date.parse(current.updated_at) > Date.parse(command.updated_at)) return [...commands];
    const next = [...commands];
    next[index] = command;
    return next;
  }
  return [...commands, command].sort(newestFirst).slice(0, limit);
}

/**
 * Splits a result into short values (shown inline) and long text (shown in an expandable
 * <pre>): multi-line or long strings, and every string a collect-logs answer carries.
 */
export function splitResult(
  type: string,
  result: Record<string, Scalar>,
): { short: [string, Scalar][]; long: [string, string][] } {
  const short: [string, Scalar][] = [];
  const long: [string, string][] = [];
  for (const [key, value] of Object.entries(result)) {
    if (typeof value === "string" && (type === "collect-logs" || value.includes("\n") || value.length > 80)) {
      long.push([key, value]);
    } else {
      short.push([key, value]);
    }
  }
  return { short, long };
}

export function formatScalar(value: Scalar): string {
  return typeof value === "string" ? value : JSON.stringify(value);
}
