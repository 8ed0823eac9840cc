import { useEffect, useState, type FormEvent } from "react";
import { useSearchParams } from "react-router-dom";
import { isAbortError } from "../api";
import { PageError } from "../access";
import { AUDIT_OUTCOMES, listAudit, type AuditEventPublic, type AuditOutcome, type AuditQuery } from "../accessApi";
import { absoluteTime, EM_DASH, relativeTime } from "../format";
import { useNow } from "../hooks/useNow";

/** Events per page; the service caps a request at its own maximum. */
const LIMIT = 200;
const FILTERS = ["actor", "action", "target", "outcome"] as const;
type FilterName = (typeof FILTERS)[number];

const OUTCOME_TONE: Record<AuditOutcome, string> = { success: "tone-good", denied: "tone-bad", failed: "tone-bad" };

function isOutcome(value: string | null): value is AuditOutcome {
  return value !== null && (AUDIT_OUTCOMES as readonly string[]).includes(value);
}

function detailText(detail: Record<string, unknown> | null): string {
  if (detail === null) return "";
  return Object.entries(detail)
    .map(([key, value]) => `${key}=${typeof value === "string" ? value : JSON.stringify(value)}`)
    .join(" ");
}

/** The audit log [admin], newest first, filtered by actor, action, target and outcome. */
export function Audit() {
  const now = useNow(30_000);
  const [searchParams, setSearchParams] = useSearchParams();
  const [draft, setDraft] = useState<Record<FilterName, string>>(() => ({
    actor: searchParams.get("actor") ?? "",
    action: searchParams.get("action") ?? "",
    target: searchParams.get("target") ?? "",
    outcome: searchParams.get("outcome") ?? "",
  }));
  const [events, setEvents] = useState<AuditEventPublic[] | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [loading, setLoading] = useState(false);
  const [tick, setTick] = useState(0);

  const queryKey = searchParams.toString();
  useEffect(() => {
    const params = new URLSearchParams(queryKey);
    const outcome = params.get("outcome");
    const query: AuditQuery = {
      actor: params.get("actor") ?? undefined,
      action: params.get("action") ?? undefined,
      target: params.get("target") ?? undefined,
      outcome: isOutcome(outcome) ? outcome : undefined,
      limit: LIMIT,
    };
    const controller = new AbortController();
    setLoading(true);
    listAudit(query, controller.signal)
      .then((list) => {
        setEvents(list);
        setError(null);
      })
      .catch((err: unknown) => {
        if (!isAbortError(err)) setError(err);
      })
      .finally(() => {
        if (!controller.signal.aborted) setLoading(false);
      });
    return () => controller.abort();
  }, [queryKey, tick]);

  function apply(event: FormEvent<HTMLFormElement>): void {
    event.preventDefault();
    const next = new URLSearchParams();
    for (const name of FILTERS) {
      const value = draft[name].trim();
      if (value !== "") next.set(name, value);
    }
    if (next.toString() === queryKey) setTick((n) => n + 1);
    else setSearchParams(next, { replace: true });
  }

  function edit(name: FilterName, value: string): void {
    setDraft((current) => ({ ...current, [name]: value }));
  }

  return (
    <div className="audit-page">
      <title>Audit log · edgefleet</title>
      <div className="page-header">
        <div>
          <h1>Audit log</h1>
          <p className="page-subtitle">
            Every change and every refused attempt: who, what, on what, when, from where, and how it
            ended. Entries cannot be edited or deleted.
          </p>
        </div>
      </div>
      <form className="form panel audit-filters" data-testid="audit-filters" onSubmit={apply}>
        <div className="field-row">
          <label className="field">
            <span className="field-label">Actor</span>
            <input name="actor" type="text" autoComplete="off" value={draft.actor} onChange={(e) => edit("actor", e.target.value)} />
          </label>
          <label className="field">
            <span className="field-label">Action (user.* for a prefix)</span>
            <input name="action" type="text" autoComplete="off" value={draft.action} onChange={(e) => edit("action", e.target.value)} />
          </label>
          <label className="field">
            <span className="field-label">Target</span>
            <input name="target" type="text" autoComplete="off" value={draft.target} onChange={(e) => edit("target", e.target.value)} />
          </label>
          <label className="field">
            <span className="field-label">Outcome</span>
            <select name="outcome" value={draft.outcome} onChange={(e) => edit("outcome", e.target.value)}>
              <option value="">any</option>
              {AUDIT_OUTCOMES.map((o) => (
                <option key={o} value={o}>
                  {o}
                </option>
              ))}
            </select>
          </label>
        </div>
        <div className="form-actions">
          <button type="submit" className="button button-primary" disabled={loading}>
            {loading ? "Loading…" : "Show"}
          </button>
        </div>
      </form>
      <PageError error={error} />
      {events === null && error === null && <p className="muted loading">Loading the audit log…</p>}
      {events !== null && events.length === 0 && (
        <div className="empty-state" data-testid="audit-empty">
          <p>No recorded actions match.</p>
        </div>
      )}
      {events !== null && events.length > 0 && (
        <div className="table-wrap">
          <table className="table audit-table" data-testid="audit-table">
            <thead>
              <tr>
                <th scope="col">When</th>
                <th scope="col">Actor</th>
                <th scope="col">Action</th>
                <th scope="col">Target</th>
                <th scope="col">Outcome</th>
                <th scope="col">From</th>
                <th scope="col">Detail</th>
              </tr>
            </thead>
            <tbody>
              {events.map((e) => (
                <tr key={e.id} data-audit-action={e.action} data-outcome={e.outcome}>
                  <td className="nowrap" title={absoluteTime(e.at)}>
                    {relativeTime(e.at, now)}
                  </td>
                  <td className="nowrap">
                    <span className="mono">{e.actor}</span>{" "}
                    <span className="muted small">
                      {e.actor_kind}
                      {e.role ? ` · ${e.role}` : ""}
                    </span>
                  </td>
                  <td className="mono" data-testid="audit-action">
                    {e.action}
                  </td>
                  <td className="mono small" data-testid="audit-target">
                    {e.target ?? EM_DASH}
                  </td>
                  <td>
                    <span className={`badge ${OUTCOME_TONE[e.outcome]}`}>{e.outcome}</span>
                  </td>
                  <td className="mono small">{e.address ?? EM_DASH}</td>
                  <td className="mono small audit-detail">{detailText(e.detail)}</td>
                </tr>
              ))}
            </tbody>
          </table>
          {events.length === LIMIT && (
            <p className="muted small table-note">Showing the newest {LIMIT}; narrow the filters to see older ones.</p>
          )}
        </div>
      )}
    </div>
  );
}
