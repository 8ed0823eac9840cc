// Typed client for the fleet page's history (GET /api/v1/fleet/overview).
import { requestJson } from "./api";

/** One line of a chart: a kind, reason, route, status or quantile, one value per timestamp. */
export interface FleetSeries {
  name: string;
  /** Null where there is nothing to say (no batch committed, no request, database unreadable). */
  values: (number | null)[];
}

/** The service's own samples of its metrics; see fleet_service/fleet_history.py. */
export interface FleetOverview {
  minutes: number;
  /** Seconds between the service's samples. */
  interval_s: number;
  /** Seconds one point covers (long ranges merge neighbouring samples). */
  point_s: number;
  /** End of each point, unix seconds. */
  timestamps: number[];
  devices: FleetSeries[];
  /** Messages per second by kind. */
  ingested: FleetSeries[];
  /** Rejected messages per second by reason. */
  rejected: FleetSeries[];
  /** Seconds: p50 and p99. */
  commit_latency: FleetSeries[];
  /** Seconds, by route template. */
  http_p95: FleetSeries[];
  commands: FleetSeries[];
  deployments: FleetSeries[];
}

export function getFleetOverview(minutes: number, signal?: AbortSignal): Promise<FleetOverview> {
  const params = new URLSearchParams({ minutes: String(minutes) });
  return requestJson<FleetOverview>(`/fleet/overview?${params.toString()}`, { signal });
}
