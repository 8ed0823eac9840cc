import { useEffect, useRef, useState } from "react";
import { Link } from "react-router-dom";
import { errorMessage, isAbortError } from "../api";
import { Alert } from "../components/Alert";
import { DeploymentStateBadge } from "../components/ModelBadges";
import { absoluteTime, relativeTime } from "../format";
import { useNow } from "../hooks/useNow";
import { useDeploymentEvents, useLive } from "../live";
import { batchLabel, upsertDeployment } from "../models";
import { listDeployments, type DeploymentPublic } from "../modelsApi";

/** Re-read the list this often while a deployment is under way, in case an event was missed. */
const POLL_MS = 10_000;

function targetCounts(deployment: DeploymentPublic): string {
  const running = deployment.targets.filter((t) => t.state === "running").length;
  const failed = deployment.targets.filter((t) => t.state === "failed").length;
  const parts = [`${running}/${deployment.targets.length} running`];
  if (failed > 0) parts.push(`${failed} failed`);
  return parts.join(", ");
}

/** Every deployment, newest first, live. */
export function Deployments() {
  const { epoch } = useLive();
  const now = useNow(5_000);
  const [deployments, setDeployments] = useState<DeploymentPublic[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [tick, setTick] = useState(0);
  const pending = useRef<DeploymentPublic[] | null>(null);

  useEffect(() => {
    const controller = new AbortController();
    pending.current = [];
    listDeployments(controller.signal)
      .then((list) => {
        if (controller.signal.aborted) return;
        let next = list;
        for (const d of pending.current ?? []) next = upsertDeployment(next, d);
        pending.current = null;
        setDeployments(next);
        setError(null);
      })
      .catch((err: unknown) => {
        if (isAbortError(err)) return;
        pending.current = null;
        setError(errorMessage(err));
      });
    return () => controller.abort();
  }, [epoch, tick]);

  const active = deployments?.some((d) => d.state === "running") ?? false;
  useEffect(() => {
    if (!active) return;
    const timer = setInterval(() => setTick((n) => n + 1), POLL_MS);
    return () => clearInterval(timer);
  }, [active]);

  useDeploymentEvents((deployment) => {
    pending.current?.push(deployment);
    setDeployments((current) => (current === null ? current : upsertDeployment(current, deployment)));
  });

  return (
    <div className="deployments-page">
      <title>Deployments · edgefleet</title>
      <div className="page-header">
        <div>
          <h1>Deployments</h1>
          {deployments !== null && (
            <p className="page-subtitle">
              {deployments.length} {deployments.length === 1 ? "deployment" : "deployments"} ·{" "}
              {deployments.filter((d) => d.state === "running").length} running
            </p>
          )}
        </div>
      </div>
      {error && <Alert>{error}</Alert>}
      {deployments === null && !error && <p className="muted loading">Loading deployments…</p>}
      {deployments !== null && deployments.length === 0 && (
        <div className="empty-state" data-testid="deployments-empty">
          <p>
            No deployments yet. Pick a release on the <Link to="/models">Models</Link> page and deploy it.
          </p>
        </div>
      )}
      {deployments !== null && deployments.length > 0 && (
        <div className="table-wrap">
          <table className="table deployments-table" data-testid="deployments-table">
            <thead>
              <tr>
                <th scope="col">Model</th>
                <th scope="col">State</th>
                <th scope="col">Batch</th>
                <th scope="col">Targets</th>
                <th scope="col">Started</th>
                <th scope="col">Updated</th>
              </tr>
            </thead>
            <tbody>
              {deployments.map((d) => (
                <tr key={d.id} data-deployment-id={d.id} data-state={d.state}>
                  <td>
                    <Link to={`/deployments/${encodeURIComponent(d.id)}`} className="device-link">
                      {d.model_name} {d.version}
                    </Link>{" "}
                    <span className="muted small">release {d.release}</span>
                  </td>
                  <td>
                    <DeploymentStateBadge state={d.state} />
                  </td>
                  <td className="nowrap">{batchLabel(d)}</td>
                  <td className="nowrap">{targetCounts(d)}</td>
                  <td className="nowrap" title={`${absoluteTime(d.created_at)} by ${d.created_by}`}>
                    {relativeTime(d.created_at, now)}
                  </td>
                  <td className="nowrap" title={absoluteTime(d.updated_at)}>
                    {relativeTime(d.updated_at, now)}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </div>
  );
}
