import { useMemo } from "react";
import { Link } from "react-router-dom";
import { absoluteTime, EM_DASH, relativeTime } from "../format";
import { buildResultSeries, resultOutcome } from "../models";
import type { ResultPublic, ResultSummary } from "../modelsApi";
import { TimeSeriesChart, type ChartSeries } from "./TimeSeriesChart";

/** One colour per version line, oldest to newest (the newest gets the accent). */
const VERSION_COLORS = ["#94a3b8", "#0d9488", "#7c3aed", "#2563eb"] as const;

const fmtMs = (v: number): string => (v >= 100 ? `${v.toFixed(0)} ms` : `${v.toFixed(1)} ms`);
const fmtPercent = (v: number): string => `${Math.round(v)}%`;
const fmtRate = (v: number): string => `${v.toFixed(1)}/s`;

function fixed(value: number | null, digits: number, unit = ""): string {
  return value === null || !Number.isFinite(value) ? EM_DASH : `${value.toFixed(digits)}${unit}`;
}

/** Count, error rate, latency percentiles and quality per (model, version). */
export function ResultSummaryTable({ rows, showModel }: { rows: readonly ResultSummary[]; showModel: boolean }) {
  if (rows.length === 0) return <p className="muted" data-testid="summary-empty">No results yet.</p>;
  return (
    <div className="table-wrap">
      <table className="table summary-table" data-testid="result-summary">
        <thead>
          <tr>
            {showModel && <th scope="col">Model</th>}
            <th scope="col">Version</th>
            <th scope="col" className="num">Results</th>
            <th scope="col" className="num">Errors</th>
            <th scope="col" className="num">Error rate</th>
            <th scope="col" className="num">p50 latency</th>
            <th scope="col" className="num">p95 latency</th>
            <th scope="col" className="num">Mean confidence</th>
            <th scope="col" className="num">Tokens/s</th>
          </tr>
        </thead>
        <tbody>
          {rows.map((row) => (
            <tr key={`${row.model}/${row.version}`} data-model={row.model} data-version={row.version}>
              {showModel && <td className="mono">{row.model}</td>}
              <td>{row.version}</td>
              <td className="num" data-testid="summary-count">
                {row.count}
              </td>
              <td className="num">{row.errors}</td>
              <td className="num" data-testid="summary-error-rate">
                {fixed(row.error_rate * 100, 1, "%")}
              </td>
              <td className="num" data-testid="summary-p50">
                {fixed(row.p50_latency_ms, 1, " ms")}
              </td>
              <td className="num" data-testid="summary-p95">
                {fixed(row.p95_latency_ms, 1, " ms")}
              </td>
              <td className="num" data-testid="summary-confidence">
                {row.mean_confidence === null ? EM_DASH : fixed(row.mean_confidence * 100, 1, "%")}
              </td>
              <td className="num">{fixed(row.mean_tokens_per_s, 1)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

interface ResultChartsProps {
  results: readonly ResultPublic[];
  /** Visible x window in unix seconds. */
  xRange: readonly [number, number];
}

/** Latency, and confidence or tokens/s, over time: one line per model version. */
export function ResultCharts({ results, xRange }: ResultChartsProps) {
  const { series, latency, confidence, tokens } = useMemo(() => {
    const built = buildResultSeries(results);
    const offset = VERSION_COLORS.length - built.versions.length;
    const color = (i: number): string => VERSION_COLORS[offset + i] ?? VERSION_COLORS[0];
    const lines = (pick: (v: (typeof built.versions)[number]) => (number | null)[]): ChartSeries[] =>
      built.versions.map((v, i) => ({ label: v.version, color: color(i), values: pick(v) }));
    return {
      series: built,
      latency: lines((v) => v.latency),
      confidence: lines((v) => v.confidence.map((c) => (c === null ? null : c * 100))),
      tokens: lines((v) => v.tokensPerS),
    };
  }, [results]);
  return (
    <div className="charts-grid">
      <TimeSeriesChart
        testId="chart-latency"
        title="Latency"
        xs={series.xs}
        series={latency}
        xRange={xRange}
        yScale="zero-based"
        formatValue={fmtMs}
        spanGaps
      />
      {series.hasTokens && !series.hasConfidence ? (
        <TimeSeriesChart
          testId="chart-tokens"
          title="Tokens per second"
          xs={series.xs}
          series={tokens}
          xRange={xRange}
          yScale="zero-based"
          formatValue={fmtRate}
          spanGaps
        />
      ) : (
        <TimeSeriesChart
          testId="chart-confidence"
          title="Confidence"
          xs={series.xs}
          series={confidence}
          xRange={xRange}
          yScale="percent"
          formatValue={fmtPercent}
          spanGaps
        />
      )}
    </div>
  );
}

interface ResultsTableProps {
  results: readonly ResultPublic[];
  now: number;
  showDevice: boolean;
  showModel: boolean;
  hostnames?: ReadonlyMap<string, string>;
}

/** The most recent results, newest first. */
export function ResultsTable({ results, now, showDevice, showModel, hostnames }: ResultsTableProps) {
  if (results.length === 0) {
    return (
      <p className="muted" data-testid="results-empty">
        No results yet.
      </p>
    );
  }
  return (
    <div className="table-wrap">
      <table className="table results-table" data-testid="results-table">
        <thead>
          <tr>
            <th scope="col">Time</th>
            {showDevice && <th scope="col">Device</th>}
            {showModel && <th scope="col">Model</th>}
            <th scope="col">Version</th>
            <th scope="col">Outcome</th>
            <th scope="col" className="num">Latency</th>
            <th scope="col">Source</th>
            <th scope="col">Input</th>
          </tr>
        </thead>
        <tbody>
          {results.map((r) => (
            <tr
              key={`${r.device_id}/${r.message_id}`}
              data-testid="result-row"
              data-message-id={r.message_id}
              data-device-id={r.device_id}
              data-version={r.version}
              data-error={r.error === null ? "false" : "true"}
            >
              <td className="nowrap" title={absoluteTime(r.timestamp)}>
                <time dateTime={r.timestamp}>{relativeTime(r.timestamp, now)}</time>
              </td>
              {showDevice && (
                <td>
                  <Link to={`/devices/${encodeURIComponent(r.device_id)}`}>{hostnames?.get(r.device_id) ?? r.device_id}</Link>
                </td>
              )}
              {showModel && (
                <td className="mono">
                  <Link to={`/results?model=${encodeURIComponent(r.model)}`}>{r.model}</Link>
                </td>
              )}
              <td title={`release ${r.release}, ${r.runtime}, sha256 ${r.sha256}`}>{r.version}</td>
              <td
                data-testid="result-outcome"
                className={r.error === null ? "result-outcome" : "result-outcome text-bad"}
                title={r.scores ? Object.entries(r.scores).map(([k, v]) => `${k}: ${v.toFixed(3)}`).join("\n") : undefined}
              >
                {resultOutcome(r)}
                {r.tokens_per_s !== null && (
                  <span className="muted small">
                    {" "}
                    · {r.tokens ?? "?"} tokens, {r.tokens_per_s.toFixed(1)}/s
                  </span>
                )}
              </td>
              <td className="num" data-testid="result-latency">
                {fmtMs(r.latency_ms)}
              </td>
              <td>{r.source}</td>
              <td className="mono small result-input">{r.input_ref ?? EM_DASH}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}
