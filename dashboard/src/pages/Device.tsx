import { useEffect, useMemo, useRef, useState } from "react";
import { Link, useParams, useSearchParams } from "react-router-dom";
import {
  ApiError,
  errorMessage,
  getDevice,
  getTelemetry,
  isAbortError,
  type DevicePublic,
  type TelemetryPoint,
} from "../api";
import type { DeviceWithIdentity } from "../accessApi";
import { Alert } from "../components/Alert";
import { CommandsPanel } from "../components/CommandsPanel";
import { DesiredPanel } from "../components/DesiredPanel";
import { DeviceHeader } from "../components/DeviceHeader";
import { DeviceModelsPanel } from "../components/DeviceModelsPanel";
import { DeviceRevoke } from "../components/DeviceRevoke";
import { DeviceResultsPanel } from "../components/DeviceResultsPanel";
import { LogsPanel } from "../components/LogsPanel";
import { DEFAULT_RANGE, findRange, LONG_RANGES, RangePicker } from "../components/RangePicker";
import { TimeSeriesChart } from "../components/TimeSeriesChart";
import { absoluteTime, bytes } from "../format";
import { useNow } from "../hooks/useNow";
import { useDeviceEvents, useLive } from "../live";
import { appendPoint, buildSeries } from "../telemetry";

/** Upper bound on points per request: 24 h at the default 30 s interval is 2 880. */
const TELEMETRY_LIMIT = 5000;
/** The chart window slides in steps of this many milliseconds. */
const WINDOW_STEP_MS = 15_000;

const COLORS = {
  cpu: "#2563eb",
  memory: "#7c3aed",
  temperature: "#ea580c",
  load: "#0d9488",
  sent: "#db2777",
  recv: "#16a34a",
} as const;

const fmtPercent = (v: number): string => `${Math.round(v)}%`;
const fmtTemp = (v: number): string => `${v.toFixed(1)} °C`;
const fmtLoad = (v: number): string => (Math.abs(v) >= 10 ? v.toFixed(0) : v.toFixed(2));
const fmtRate = (v: number): string => `${bytes(v)}/s`;

/** Route element: a fresh page state per device id. */
export function DevicePage() {
  const { id = "" } = useParams();
  return <Device key={id} id={id} />;
}

function Device({ id }: { id: string }) {
  const [searchParams, setSearchParams] = useSearchParams();
  const range = findRange(searchParams.get("range"), LONG_RANGES);
  const { epoch } = useLive();
  const now = useNow(1000);

  const [device, setDevice] = useState<DeviceWithIdentity | null>(null);
  const [points, setPoints] = useState<readonly TelemetryPoint[]>([]);
  const [loading, setLoading] = useState(true);
  const [error, setError] = useState<ApiError | string | null>(null);
  // A live update received while a request is in flight wins over the (older) response.
  const liveDuringFetch = useRef<DevicePublic | null>(null);
  const fetching = useRef(false);

  useEffect(() => {
    const controller = new AbortController();
    const since = new Date(Date.now() - range.seconds * 1000);
    fetching.current = true;
    liveDuringFetch.current = null;
    setLoading(true);
    Promise.all([
      getDevice(id, controller.signal),
      getTelemetry(id, { since, limit: TELEMETRY_LIMIT }, controller.signal),
    ])
      .then(([fetched, telemetry]) => {
        if (controller.signal.aborted) return;
        const live = liveDuringFetch.current;
        let merged: readonly TelemetryPoint[] = telemetry;
        if (live?.telemetry) merged = appendPoint(merged, live.telemetry, since.getTime());
        setDevice(live ?? fetched);
        setPoints(merged);
        setError(null);
      })
      .catch((err: unknown) => {
        if (isAbortError(err)) return;
        setError(err instanceof ApiError ? err : errorMessage(err));
      })
      .finally(() => {
        if (controller.signal.aborted) return;
        fetching.current = false;
        setLoading(false);
      });
    return () => {
      fetching.current = false;
      controller.abort();
    };
  }, [id, range.seconds, epoch]);

  useDeviceEvents((update) => {
    if (update.id !== id) return;
    if (fetching.current) liveDuringFetch.current = update;
    setDevice(update);
    const point = update.telemetry;
    if (point) {
      setPoints((current) => appendPoint(current, point, Date.now() - range.seconds * 1000));
    }
  });

  const series = useMemo(() => buildSeries(points), [points]);
  const windowEnd = Math.ceil(now / WINDOW_STEP_MS) * WINDOW_STEP_MS;
  const xRange = useMemo<readonly [number, number]>(
    () => [(windowEnd - range.seconds * 1000) / 1000, windowEnd / 1000],
    [windowEnd, range.seconds],
  );
  const cpuSeries = useMemo(() => [{ label: "CPU", color: COLORS.cpu, values: series.cpu }], [series]);
  const memSeries = useMemo(() => [{ label: "RAM", color: COLORS.memory, values: series.memory }], [series]);
  const tempSeries = useMemo(
    () => [{ label: "Temperature", color: COLORS.temperature, values: series.temperature }],
    [series],
  );
  const loadSeries = useMemo(() => [{ label: "Load (1 min)", color: COLORS.load, values: series.load }], [series]);
  const netSeries = useMemo(
    () => [
      { label: "Received", color: COLORS.recv, values: series.netRecv },
      { label: "Sent", color: COLORS.sent, values: series.netSent },
    ],
    [series],
  );

  function selectRange(key: string): void {
    const next = new URLSearchParams(searchParams);
    if (key === DEFAULT_RANGE) next.delete("range");
    else next.set("range", key);
    setSearchParams(next, { replace: true });
  }

  const notFound = error instanceof ApiError && error.status === 404;
  const errorText = error instanceof ApiError ? error.detail : error;

  return (
    <div className="device-page">
      <title>{`${device?.hostname ?? id} · edgefleet`}</title>
      <Link to="/" className="back-link">
        ← All devices
      </Link>

      {notFound && device === null ? (
        <div className="empty-state">
          <p>
            No device with id <code>{id}</code>. It may have been removed.
          </p>
        </div>
      ) : (
        <>
          {errorText && <Alert>{errorText}</Alert>}
          {device === null && !error && <p className="muted loading">Loading device…</p>}
          {device !== null && (
            <DeviceHeader
              device={device}
              now={now}
              actions={<DeviceRevoke device={device} onRevoked={setDevice} />}
            />
          )}
          {device?.revoked_at && (
            <Alert kind="info">
              <span data-testid="revoked-note">
                This device's identity was revoked {absoluteTime(device.revoked_at)}: it cannot connect or
                enroll again with it. Its history below is kept.
              </span>
            </Alert>
          )}

          {device !== null && (
            <section className="telemetry-section" aria-labelledby="telemetry-heading">
              <div className="section-header">
                <h2 id="telemetry-heading">Telemetry</h2>
                <div className="section-tools">
                  {loading && <span className="muted small">Loading…</span>}
                  <RangePicker value={range.key} onChange={selectRange} ranges={LONG_RANGES} />
                </div>
              </div>
              {!loading && points.length === 0 && (
                <Alert kind="info">No telemetry from this device in the last {range.label}.</Alert>
              )}
              <div className="charts-grid">
                <TimeSeriesChart
                  testId="chart-cpu"
                  title="CPU %"
                  xs={series.xs}
                  series={cpuSeries}
                  xRange={xRange}
                  yScale="percent"
                  formatValue={fmtPercent}
                />
                <TimeSeriesChart
                  testId="chart-ram"
                  title="RAM %"
                  xs={series.xs}
                  series={memSeries}
                  xRange={xRange}
                  yScale="percent"
                  formatValue={fmtPercent}
                />
                {series.hasTemperature && (
                  <TimeSeriesChart
                    testId="chart-temperature"
                    title="Temperature"
                    xs={series.xs}
                    series={tempSeries}
                    xRange={xRange}
                    yScale="auto"
                    formatValue={fmtTemp}
                  />
                )}
                <TimeSeriesChart
                  testId="chart-load"
                  title="Load average (1 min)"
                  xs={series.xs}
                  series={loadSeries}
                  xRange={xRange}
                  yScale="zero-based"
                  formatValue={fmtLoad}
                />
                <TimeSeriesChart
                  testId="chart-network"
                  title="Network"
                  xs={series.xs}
                  series={netSeries}
                  xRange={xRange}
                  yScale="zero-based"
                  formatValue={fmtRate}
                />
              </div>
            </section>
          )}

          {device !== null && <CommandsPanel deviceId={id} />}
          {device !== null && <DeviceModelsPanel device={device} />}
          {device !== null && <DeviceResultsPanel deviceId={id} rangeSeconds={range.seconds} />}
          {device !== null && <DesiredPanel device={device} />}
          {device !== null && <LogsPanel deviceId={id} />}
        </>
      )}
    </div>
  );
}
