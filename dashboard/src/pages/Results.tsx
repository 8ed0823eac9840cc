import { useEffect, useMemo, useState } from "react";
import { useSearchParams } from "react-router-dom";
import { errorMessage, isAbortError, listDevices } from "../api";
import { Alert } from "../components/Alert";
import { DEFAULT_RANGE, findRange, RangePicker } from "../components/RangePicker";
import { ResultCharts, ResultSummaryTable, ResultsTable } from "../components/ResultsView";
import { useNow } from "../hooks/useNow";
import { useResults } from "../hooks/useResults";
import { useLive } from "../live";
import { listModels } from "../modelsApi";

/** The results table shows this many rows; the charts use every loaded result. */
const TABLE_ROWS = 50;
/** The chart window slides in steps of this many milliseconds. */
const WINDOW_STEP_MS = 5_000;

/** Inference results per model: summary by version, charts and the latest results, live. */
export function Results() {
  const [searchParams, setSearchParams] = useSearchParams();
  const model = searchParams.get("model") ?? undefined;
  const range = findRange(searchParams.get("range"));
  const { epoch } = useLive();
  const now = useNow(1000);
  const [names, setNames] = useState<string[]>([]);
  const [hostnames, setHostnames] = useState<ReadonlyMap<string, string>>(new Map());
  const [listError, setListError] = useState<string | null>(null);
  const { results, summary, error } = useResults({ model });

  useEffect(() => {
    const controller = new AbortController();
    Promise.all([listModels(undefined, controller.signal), listDevices(controller.signal)])
      .then(([releases, devices]) => {
        if (controller.signal.aborted) return;
        setNames([...new Set(releases.map((r) => r.name))].sort());
        setHostnames(new Map(devices.map((d) => [d.id, d.hostname])));
        setListError(null);
      })
      .catch((err: unknown) => {
        if (isAbortError(err)) return;
        setListError(errorMessage(err));
      });
    return () => controller.abort();
  }, [epoch]);

  function setParam(key: string, value: string | null): void {
    const next = new URLSearchParams(searchParams);
    if (value === null) next.delete(key);
    else next.set(key, value);
    setSearchParams(next, { replace: true });
  }

  const windowEnd = Math.ceil(now / WINDOW_STEP_MS) * WINDOW_STEP_MS;
  const xRange = useMemo<readonly [number, number]>(
    () => [(windowEnd - range.seconds * 1000) / 1000, windowEnd / 1000],
    [windowEnd, range.seconds],
  );
  const options = model !== undefined && !names.includes(model) ? [...names, model].sort() : names;

  return (
    <div className="results-page">
      <title>{`Results${model ? ` · ${model}` : ""} · edgefleet`}</title>
      <div className="page-header">
        <div>
          <h1>Results</h1>
          <p className="page-subtitle">
            {model ? (
              <>
                Model <span className="mono">{model}</span>
              </>
            ) : (
              "All models"
            )}
          </p>
        </div>
        <div className="page-tools">
          <label className="inline-field">
            <span className="field-label">Model</span>
            <select
              name="results-model"
              aria-label="Model"
              value={model ?? ""}
              onChange={(e) => setParam("model", e.target.value === "" ? null : e.target.value)}
            >
              <option value="">all models</option>
              {options.map((name) => (
                <option key={name} value={name}>
                  {name}
                </option>
              ))}
            </select>
          </label>
        </div>
      </div>
      {listError && <Alert>{listError}</Alert>}
      {error && <Alert>{error}</Alert>}

      <section className="panel first-panel" aria-labelledby="summary-heading">
        <div className="section-header">
          <h2 id="summary-heading">Summary by version</h2>
        </div>
        {summary === null ? (
          <p className="muted loading">Loading summary…</p>
        ) : (
          <ResultSummaryTable rows={summary} showModel={model === undefined} />
        )}
      </section>

      <section className="panel" aria-labelledby="result-charts-heading">
        <div className="section-header">
          <h2 id="result-charts-heading">Over time</h2>
          <RangePicker value={range.key} onChange={(key) => setParam("range", key === DEFAULT_RANGE ? null : key)} />
        </div>
        <ResultCharts results={results ?? []} xRange={xRange} />
      </section>

      <section className="panel" aria-labelledby="recent-results-heading">
        <div className="section-header">
          <h2 id="recent-results-heading">Latest results</h2>
          {results !== null && (
            <span className="muted small" data-testid="results-count" data-count={results.length}>
              {results.length > TABLE_ROWS ? `newest ${TABLE_ROWS} of ${results.length} loaded` : `${results.length} loaded`}
            </span>
          )}
        </div>
        {results === null ? (
          <p className="muted loading">Loading results…</p>
        ) : (
          <ResultsTable
            results={results.slice(0, TABLE_ROWS)}
            now={now}
            showDevice
            showModel={model === undefined}
            hostnames={hostnames}
          />
        )}
      </section>
    </div>
  );
}
