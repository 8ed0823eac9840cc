import { useEffect, useMemo, useState } from "react";
import { useSearchParams } from "react-router-dom";
import { errorMessage, isAbortError } from "../api";
import { Alert } from "../components/Alert";
import { DEFAULT_RANGE, findRange, RangePicker } from "../components/RangePicker";
import { TimeSeriesChart, type ChartSeries } from "../components/TimeSeriesChart";
import { getFleetOverview, type FleetOverview, type FleetSeries } from "../fleetApi";
import { useLive } from "../live";

/** The service samples every 15 s by default: re-reading faster would only repeat the answer. */
const REFRESH_MS = 15_000;
/** HTTP p95 draws this many routes, the slowest in the range; a legend of fifty says nothing. */
const HTTP_ROUTES_SHOWN = 8;

const PALETTE = ["#2563eb", "#7c3aed", "#0d9488", "#ea580c", "#db2777", "#16a34a", "#ca8a04", "#64748b"];
/** States that mean the same everywhere keep their colour across charts. */
const STATE_COLORS: Record<string, string> = {
  online: "#16a34a",
  offline: "#94a3b8",
  unknown: "#ca8a04",
  succeeded: "#16a34a",
  completed: "#16a34a",
  failed: "#dc2626",
  halted: "#dc2626",
  running: "#2563eb",
  pending: "#94a3b8",
  p50: "#2563eb",
  p99: "#ea580c",
};

function toChart(series: readonly FleetSeries[]): ChartSeries[] {
  let next = 0;
  return series.map((s) => ({
    label: s.name,
    color: STATE_COLORS[s.name] ?? PALETTE[next++ % PALETTE.length] ?? "#64748b",
    values: s.values,
  }));
}

function peak(s: FleetSeries): number {
  return s.values.reduce<number>((max, v) => (v !== null && v > max ? v : max), 0);
}

const fmtRate = (v: number): string => `${v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)}/s`;
const fmtSeconds = (v: number): string =>
  v >= 1 ? `${v.toFixed(2)} s` : `${(v * 1000).toFixed(v < 0.01 ? 1 : 0)} ms`;
const fmtCount = (v: number): string => (Number.isInteger(v) ? String(v) : v.toFixed(1));

/** "12 online · 1 offline": the newest readable device counts. */
function latestDevices(overview: FleetOverview): string | null {
  const parts: string[] = [];
  for (const s of overview.devices) {
    const last = [...s.values].reverse().find((v) => v !== null);
    if (last === undefined) return null;
    parts.push(`${last} ${s.name}`);
  }
  return parts.length > 0 ? parts.join(" · ") : null;
}

/** The headline charts of the Grafana fleet overview, from the service's own history. */
export function Fleet() {
  const [searchParams, setSearchParams] = useSearchParams();
  const range = findRange(searchParams.get("range"));
  const { epoch } = useLive();
  const [overview, setOverview] = useState<FleetOverview | null>(null);
  const [fetchedAt, setFetchedAt] = useState(() => Date.now());
  const [error, setError] = useState<string | null>(null);
  const [tick, setTick] = useState(0);

  useEffect(() => {
    const timer = setInterval(() => setTick((n) => n + 1), REFRESH_MS);
    return () => clearInterval(timer);
  }, []);

  useEffect(() => {
    const controller = new AbortController();
    getFleetOverview(range.seconds / 60, controller.signal)
      .then((answer) => {
        if (controller.signal.aborted) return;
        setOverview(answer);
        setFetchedAt(Date.now());
        setError(null);
      })
      .catch((err: unknown) => {
        if (isAbortError(err)) return;
        setError(errorMessage(err));
      });
    return () => controller.abort();
  }, [range.seconds, tick, epoch]);

  const xRange = useMemo<readonly [number, number]>(
    () => [fetchedAt / 1000 - range.seconds, fetchedAt / 1000],
    [fetchedAt, range.seconds],
  );
  const charts = useMemo(() => {
    if (overview === null) return null;
    const routes = [...overview.http_p95].sort((a, b) => peak(b) - peak(a)).slice(0, HTTP_ROUTES_SHOWN);
    return {
      devices: toChart(overview.devices),
      ingested: toChart(overview.ingested),
      rejected: toChart(overview.rejected),
      commit: toChart(overview.commit_latency),
      http: toChart(routes.sort((a, b) => a.name.localeCompare(b.name))),
      commands: toChart(overview.commands),
      deployments: toChart(overview.deployments),
    };
  }, [overview]);

  function selectRange(key: string): void {
    const next = new URLSearchParams(searchParams);
    if (key === DEFAULT_RANGE) next.delete("range");
    else next.set("range", key);
    setSearchParams(next, { replace: true });
  }

  const xs = overview?.timestamps ?? [];
  const routeCount = overview?.http_p95.length ?? 0;
  const devices = overview === null ? null : latestDevices(overview);

  return (
    <div className="fleet-page">
      <title>Fleet · edgefleet</title>
      <div className="page-header">
        <div>
          <h1>Fleet</h1>
          <p className="page-subtitle" data-testid="fleet-devices-now">
            {devices ?? "Devices, ingestion, HTTP, commands and deployments"}
          </p>
        </div>
        <div className="page-tools">
          <RangePicker value={range.key} onChange={selectRange} />
        </div>
      </div>
      {error && <Alert>{error}</Alert>}
      {overview === null && error === null && <p className="muted loading">Loading the fleet's history…</p>}
      {overview !== null && charts !== null && (
        <>
          <p className="muted small">
            Sampled by this service process every {overview.interval_s} s
            {overview.point_s > overview.interval_s ? `, one point per ${overview.point_s} s over this range` : ""}.
            The history is kept in memory and starts again when the service restarts.
          </p>
          <div className="charts-grid">
            <TimeSeriesChart
              testId="chart-devices"
              title="Devices by status"
              xs={xs}
              series={charts.devices}
              xRange={xRange}
              yScale="zero-based"
              formatValue={fmtCount}
            />
            <TimeSeriesChart
              testId="chart-ingested"
              title="Messages ingested / s by kind"
              xs={xs}
              series={charts.ingested}
              xRange={xRange}
              yScale="zero-based"
              formatValue={fmtRate}
            />
            <TimeSeriesChart
              testId="chart-rejected"
              title="Rejected / s by reason"
              xs={xs}
              series={charts.rejected}
              xRange={xRange}
              yScale="zero-based"
              formatValue={fmtRate}
            />
            <TimeSeriesChart
              testId="chart-commit-latency"
              title="Ingest commit latency"
              xs={xs}
              series={charts.commit}
              xRange={xRange}
              yScale="zero-based"
              formatValue={fmtSeconds}
              spanGaps
            />
            <TimeSeriesChart
              testId="chart-http-p95"
              title={
                routeCount > HTTP_ROUTES_SHOWN
                  ? `HTTP p95 by route (slowest ${HTTP_ROUTES_SHOWN} of ${routeCount})`
                  : "HTTP p95 by route"
              }
              xs={xs}
              series={charts.http}
              xRange={xRange}
              yScale="zero-based"
              formatValue={fmtSeconds}
              spanGaps
            />
            <TimeSeriesChart
              testId="chart-commands"
              title="Commands by status"
              xs={xs}
              series={charts.commands}
              xRange={xRange}
              yScale="zero-based"
              formatValue={fmtCount}
            />
            <TimeSeriesChart
              testId="chart-deployments"
              title="Deployments by state"
              xs={xs}
              series={charts.deployments}
              xRange={xRange}
              yScale="zero-based"
              formatValue={fmtCount}
            />
          </div>
        </>
      )}
    </div>
  );
}
