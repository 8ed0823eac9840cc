// Turns telemetry points into chart series.
import type { TelemetryPoint } from "./api";
import { parseTime } from "./format";

export interface TelemetrySeries {
  /** Unix seconds; a gap marker (null values) is inserted where the device was silent. */
  xs: number[];
  cpu: (number | null)[];
  memory: (number | null)[];
  temperature: (number | null)[];
  load: (number | null)[];
  /** Bytes per second derived from the counters; null at gaps and counter resets. */
  netSent: (number | null)[];
  netRecv: (number | null)[];
  hasTemperature: boolean;
}

/** A silence longer than this many typical intervals breaks the line instead of bridging it. */
const GAP_FACTOR = 3;
const MIN_GAP_S = 90;

function medianInterval(times: number[]): number {
  if (times.length < 2) return 30;
  const deltas: number[] = [];
  for (let i = 1; i < times.length; i++) deltas.push(times[i]! - times[i - 1]!);
  deltas.sort((a, b) => a - b);
  return deltas[Math.floor(deltas.length / 2)] ?? 30;
}

function rate(current: number, previous: number, seconds: number): number | null {
  if (seconds <= 0) return null;
  const delta = current - previous;
  return delta < 0 ? null : delta / seconds; // negative: the counter reset (reboot or wrap)
}

export function buildSeries(points: readonly TelemetryPoint[]): TelemetrySeries {
  const timed: { t: number; p: TelemetryPoint }[] = [];
  for (const p of points) {
    const ms = parseTime(p.timestamp);
    if (ms !== null) timed.push({ t: ms / 1000, p });
  }
  timed.sort((a, b) => a.t - b.t);

  const gap = Math.max(medianInterval(timed.map((x) => x.t)) * GAP_FACTOR, MIN_GAP_S);
  const out: TelemetrySeries = {
    xs: [],
    cpu: [],
    memory: [],
    temperature: [],
    load: [],
    netSent: [],
    netRecv: [],
    hasTemperature: false,
  };
  const pushNulls = (t: number): void => {
    out.xs.push(t);
    out.cpu.push(null);
    out.memory.push(null);
    out.temperature.push(null);
    out.load.push(null);
    out.netSent.push(null);
    out.netRecv.push(null);
  };

  let prev: { t: number; p: TelemetryPoint } | null = null;
  for (const cur of timed) {
    if (prev !== null && cur.t === prev.t) continue; // duplicate timestamp
    const silent = prev !== null && cur.t - prev.t > gap;
    if (prev !== null && silent) pushNulls((prev.t + cur.t) / 2);
    const p = cur.p;
    out.xs.push(cur.t);
    out.cpu.push(p.cpu_percent);
    out.memory.push(p.memory_percent);
    out.temperature.push(p.temperature_c);
    if (p.temperature_c !== null) out.hasTemperature = true;
    out.load.push(p.load_1);
    if (prev === null || silent) {
      out.netSent.push(null);
      out.netRecv.push(null);
    } else {
      const dt = cur.t - prev.t;
      out.netSent.push(rate(p.net_bytes_sent, prev.p.net_bytes_sent, dt));
      out.netRecv.push(rate(p.net_bytes_recv, prev.p.net_bytes_recv, dt));
    }
    prev = cur;
  }
  return out;
}

/** Appends a live point if it is newer than the last one, dropping points that left the window. */
export function appendPoint(
  points: readonly TelemetryPoint[],
  point: TelemetryPoint,
  windowStartMs: number,
): readonly TelemetryPoint[] {
  const t = parseTime(point.timestamp);
  if (t === null) return points;
  const last = points.length > 0 ? parseTime(points[points.length - 1]!.timestamp) : null;
  if (last !== null && t <= last) return points;
  const kept = points.filter((p) => (parseTime(p.timestamp) ?? 0) >= windowStartMs);
  kept.push(point);
  return kept;
}
