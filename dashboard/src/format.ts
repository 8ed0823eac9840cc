// Display helpers. Everything the API sends is UTC ISO 8601; the UI shows local time.

export const EM_DASH = "—";

export function parseTime(iso: string | null | undefined): number | null {
  if (!iso) return null;
  const ms = Date.parse(iso);
  return Number.isNaN(ms) ? null : ms;
}

/** "12 s ago", "5 min ago", "3 h ago", "2 d ago". */
export function relativeTime(iso: string | null | undefined, now: number): string {
  const ms = parseTime(iso);
  if (ms === null) return "never";
  const seconds = Math.floor((now - ms) / 1000);
  if (seconds < 1) return "just now";
  if (seconds < 60) return `${seconds} s ago`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ago`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return `${hours} h ago`;
  return `${Math.floor(hours / 24)} d ago`;
}

export function absoluteTime(iso: string | null | undefined): string {
  const ms = parseTime(iso);
  if (ms === null) return EM_DASH;
  return new Date(ms).toLocaleString(undefined, {
    year: "numeric",
    month: "short",
    day: "numeric",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  });
}

export function percent(value: number | null | undefined): string {
  if (value == null || !Number.isFinite(value)) return EM_DASH;
  return `${value.toFixed(1)}%`;
}

export function temperature(value: number | null | undefined): string {
  if (value == null || !Number.isFinite(value)) return EM_DASH;
  return `${value.toFixed(1)} °C`;
}

const BYTE_UNITS = ["B", "KB", "MB", "GB", "TB", "PB"];

/** Binary-scaled bytes with SI-style labels, e.g. 1.5 GB. */
export function bytes(value: number | null | undefined, digits = 1): string {
  if (value == null || !Number.isFinite(value)) return EM_DASH;
  let n = Math.abs(value);
  let unit = 0;
  while (n >= 1024 && unit < BYTE_UNITS.length - 1) {
    n /= 1024;
    unit += 1;
  }
  const sign = value < 0 ? "-" : "";
  let shown: string;
  if (unit > 0) shown = n.toFixed(digits);
  else if (Number.isInteger(n) || n >= 10) shown = n.toFixed(0);
  else shown = n.toFixed(digits); // fractional bytes only occur in rates
  return `${sign}${shown} ${BYTE_UNITS[unit]}`;
}

export function duration(seconds: number | null | undefined): string {
  if (seconds == null || !Number.isFinite(seconds) || seconds < 0) return EM_DASH;
  const s = Math.floor(seconds);
  const days = Math.floor(s / 86_400);
  const hours = Math.floor((s % 86_400) / 3_600);
  const minutes = Math.floor((s % 3_600) / 60);
  if (days > 0) return `${days} d ${hours} h`;
  if (hours > 0) return `${hours} h ${minutes} min`;
  if (minutes > 0) return `${minutes} min`;
  return `${s} s`;
}
