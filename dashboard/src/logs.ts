// Pure helpers for the live log tail.
import { LOG_LEVELS, type LogLevel, type LogRecordPublic } from "./api";

/** Lines kept in memory; the oldest go first. */
export const MAX_LOG_LINES = 1000;

export function levelRank(level: LogLevel): number {
  return LOG_LEVELS.indexOf(level);
}

export function isLogLevel(value: string): value is LogLevel {
  return (LOG_LEVELS as readonly string[]).includes(value);
}

export interface LogFilter {
  /** At or above this level. */
  level: LogLevel;
  /** Substring of the message (case-insensitive here; the server's `q` decides for fetched lines); blank matches all. */
  text: string;
}

export function matchesLog(record: LogRecordPublic, filter: LogFilter): boolean {
  if (levelRank(record.level) < levelRank(filter.level)) return false;
  const needle = filter.text.trim().toLowerCase();
  if (needle === "") return true;
  return record.message.toLowerCase().includes(needle);
}

function byTime(a: LogRecordPublic, b: LogRecordPublic): number {
  return Date.parse(a.timestamp) - Date.parse(b.timestamp);
}

/**
 * Appends records (deduplicated by message id), oldest first, keeping the newest `cap`.
 * Records usually arrive in order, so the common case is a cheap append.
 */
export function appendLogs(
  current: readonly LogRecordPublic[],
  incoming: readonly LogRecordPublic[],
  cap: number = MAX_LOG_LINES,
): LogRecordPublic[] {
  if (incoming.length === 0) return [...current];
  const seen = new Set(current.map((r) => r.message_id));
  const fresh = incoming.filter((r) => {
    if (seen.has(r.message_id)) return false;
    seen.add(r.message_id);
    return true;
  });
  if (fresh.length === 0) return [...current];
  const last = current[current.length - 1];
  let next = [...current, ...fresh];
  const inOrder =
    (last === undefined || fresh.every((r) => byTime(last, r) <= 0)) &&
    fresh.every((r, i) => i === 0 || byTime(fresh[i - 1] ?? r, r) <= 0);
  if (!inOrder) next = next.sort(byTime);
  return next.length > cap ? next.slice(next.length - cap) : next;
}

/** "14:03:07.123" in local time. */
export function logTime(iso: string): string {
  const ms = Date.parse(iso);
  if (Number.isNaN(ms)) return iso;
  const d = new Date(ms);
  const pad = (n: number, w = 2): string => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}
