import { useMemo } from "react";
import { useNow } from "../hooks/useNow";
import { useResults } from "../hooks/useResults";
import { Alert } from "./Alert";
import { ResultCharts, ResultSummaryTable, ResultsTable } from "./ResultsView";

/** Rows in the device's result table. */
const TABLE_ROWS = 20;

/** A device's inference results: summary per model version, charts over `rangeSeconds`, latest rows. */
export function DeviceResultsPanel({ deviceId, rangeSeconds }: { deviceId: string; rangeSeconds: number }) {
  const now = useNow(1000);
  const { results, summary, error } = useResults({ deviceId });
  const windowEnd = Math.ceil(now / 5_000) * 5_000;
  const xRange = useMemo<readonly [number, number]>(
    () => [(windowEnd - rangeSeconds * 1000) / 1000, windowEnd / 1000],
    [windowEnd, rangeSeconds],
  );

  return (
    <section className="panel results-panel" aria-labelledby="device-results-heading" data-testid="device-results-panel">
      <div className="section-header">
        <h2 id="device-results-heading">Inference results</h2>
      </div>
      {error && <Alert>{error}</Alert>}
      {summary !== null && summary.length > 0 && <ResultSummaryTable rows={summary} showModel />}
      {results !== null && results.length > 0 && (
        <>
          <div className="panel-gap" />
          <ResultCharts results={results} xRange={xRange} />
        </>
      )}
      {results === null ? (
        <p className="muted loading">Loading results…</p>
      ) : (
        <ResultsTable results={results.slice(0, TABLE_ROWS)} now={now} showDevice={false} showModel />
      )}
    </section>
  );
}
