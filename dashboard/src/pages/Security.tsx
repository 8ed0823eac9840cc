import { useEffect, useState } from "react";
import { isAbortError } from "../api";
import { PageError } from "../access";
import { getFindings, type SecurityFindings, type Severity } from "../accessApi";
import { absoluteTime } from "../format";

const SEVERITIES: readonly Severity[] = ["high", "medium", "low"];
const SEVERITY_TONE: Record<Severity, string> = { high: "tone-bad", medium: "tone-warn", low: "tone-idle" };

/** The fleet security audit [admin]: what an owner should fix, most urgent first. */
export function Security() {
  const [report, setReport] = useState<SecurityFindings | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [loading, setLoading] = useState(true);
  const [tick, setTick] = useState(0);

  useEffect(() => {
    const controller = new AbortController();
    setLoading(true);
    getFindings(controller.signal)
      .then((found) => {
        setReport(found);
        setError(null);
      })
      .catch((err: unknown) => {
        if (!isAbortError(err)) setError(err);
      })
      .finally(() => {
        if (!controller.signal.aborted) setLoading(false);
      });
    return () => controller.abort();
  }, [tick]);

  const findings = report?.findings ?? [];
  return (
    <div className="security-page">
      <title>Security · edgefleet</title>
      <div className="page-header">
        <div>
          <h1>Security findings</h1>
          {report && (
            <p className="page-subtitle" data-testid="findings-summary">
              {SEVERITIES.map((s) => `${findings.filter((f) => f.severity === s).length} ${s}`).join(" · ")} · checked{" "}
              {absoluteTime(report.generated_at)}
            </p>
          )}
        </div>
        <div className="page-tools">
          <button type="button" className="button" disabled={loading} onClick={() => setTick((n) => n + 1)}>
            {loading ? "Checking…" : "Check again"}
          </button>
        </div>
      </div>
      <PageError error={error} />
      {report === null && error === null && <p className="muted loading">Running the security audit…</p>}
      {report !== null && findings.length === 0 && (
        <div className="empty-state" data-testid="findings-empty">
          <p>Nothing to fix: every check passed.</p>
        </div>
      )}
      {report !== null && findings.length > 0 && (
        <div className="table-wrap">
          <table className="table findings-table" data-testid="findings-table">
            <thead>
              <tr>
                <th scope="col">Severity</th>
                <th scope="col">Check</th>
                <th scope="col">Target</th>
                <th scope="col">Finding</th>
                <th scope="col">How to fix it</th>
              </tr>
            </thead>
            <tbody>
              {findings.map((f, index) => (
                <tr key={`${f.kind}:${f.target}:${index}`} data-kind={f.kind} data-severity={f.severity}>
                  <td>
                    <span className={`badge ${SEVERITY_TONE[f.severity]}`}>{f.severity}</span>
                  </td>
                  <td className="mono small">{f.kind}</td>
                  <td className="mono small">{f.target}</td>
                  <td data-testid="finding-detail">{f.detail}</td>
                  <td className="small">{f.fix}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </div>
  );
}
