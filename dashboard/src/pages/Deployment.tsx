import { useEffect, useMemo, useRef, useState } from "react";
import { Link, useParams } from "react-router-dom";
import { IfRole } from "../access";
import { ApiError, errorMessage, isAbortError, listDevices } from "../api";
import { Alert } from "../components/Alert";
import { DeploymentStateBadge, PhaseBadge, TargetStateBadge } from "../components/ModelBadges";
import { ProgressBar } from "../components/ProgressBar";
import { absoluteTime, EM_DASH, relativeTime } from "../format";
import { useNow } from "../hooks/useNow";
import { useDeploymentEvents, useDeviceEvents, useLive } from "../live";
import { batchLabel, canAct, displayBatch } from "../models";
import {
  actOnDeployment,
  CANARY_METRICS,
  getDeployment,
  type CanaryPublic,
  type DeploymentAction,
  type DeploymentPublic,
  type DeploymentTarget,
} from "../modelsApi";

/** How often the page re-reads the deployment while it can still change, in case events are missed. */
const POLL_MS = 3_000;

const ACTION_LABELS: Record<DeploymentAction, string> = { pause: "Pause", resume: "Resume", rollback: "Roll back" };

/** Route element: a fresh page state per deployment id. */
export function DeploymentPage() {
  const { id = "" } = useParams();
  return <Deployment key={id} id={id} />;
}

function TargetRow({ target, hostname }: { target: DeploymentTarget; hostname: string | undefined }) {
  const downloading = target.phase === "downloading" || (target.bytes_total ?? 0) > 0;
  return (
    <tr data-device-id={target.device_id} data-state={target.state} data-phase={target.phase ?? ""}>
      <td>
        <Link to={`/devices/${encodeURIComponent(target.device_id)}`} className="device-link">
          {hostname ?? target.device_id}
        </Link>
        {hostname && <div className="mono small muted">{target.device_id}</div>}
      </td>
      <td className="num">{displayBatch(target.batch)}</td>
      <td>
        <TargetStateBadge state={target.state} />
      </td>
      <td>{target.phase ? <PhaseBadge phase={target.phase} /> : <span className="muted">{EM_DASH}</span>}</td>
      <td className="progress-cell">
        {downloading ? (
          <ProgressBar
            testId="target-progress"
            label={`Download progress of ${hostname ?? target.device_id}`}
            done={target.bytes_done}
            total={target.bytes_total}
          />
        ) : (
          <span className="muted">{EM_DASH}</span>
        )}
      </td>
      <td className="command-detail" data-testid="target-detail">
        {target.detail ?? ""}
      </td>
    </tr>
  );
}

function untilText(iso: string, now: number): string {
  const ms = Date.parse(iso) - now;
  if (!Number.isFinite(ms) || ms <= 1000) return "now";
  return `in ${Math.ceil(ms / 1000)} s`;
}

function fmtMetric(value: number | null): string {
  return value === null ? EM_DASH : Number.isInteger(value) ? String(value) : value.toFixed(3);
}

function CanaryText({ canary }: { canary: CanaryPublic | null }) {
  if (canary === null) return <>none</>;
  const metric = CANARY_METRICS.find((m) => m.metric === canary.metric);
  return (
    <>
      {metric?.label ?? canary.metric}, margin {canary.margin}
      {metric ? ` (${metric.unit})` : ""}, after {canary.min_results} results each
      {canary.verdict !== null && (
        <>
          {" · "}
          <span
            className={canary.verdict === "failed" ? "text-bad" : canary.verdict === "passed" ? "text-good" : undefined}
            data-testid="canary-verdict"
          >
            {canary.verdict}
          </span>
          : previous release {fmtMetric(canary.baseline)} ({canary.baseline_results} results), this release{" "}
          {fmtMetric(canary.candidate)} ({canary.candidate_results} results)
        </>
      )}
    </>
  );
}

function Deployment({ id }: { id: string }) {
  const { epoch } = useLive();
  const now = useNow(5_000);
  const [deployment, setDeployment] = useState<DeploymentPublic | null>(null);
  const [hostnames, setHostnames] = useState<ReadonlyMap<string, string>>(new Map());
  const [error, setError] = useState<ApiError | string | null>(null);
  const [acting, setActing] = useState<DeploymentAction | null>(null);
  const [actionError, setActionError] = useState<string | null>(null);
  const [tick, setTick] = useState(0);

  useEffect(() => {
    const controller = new AbortController();
    getDeployment(id, controller.signal)
      .then((fetched) => {
        if (controller.signal.aborted) return;
        setDeployment((current) =>
          current !== null && Date.parse(current.updated_at) > Date.parse(fetched.updated_at) ? current : fetched,
        );
        setError(null);
      })
      .catch((err: unknown) => {
        if (isAbortError(err)) return;
        setError(err instanceof ApiError ? err : errorMessage(err));
      });
    return () => controller.abort();
  }, [id, epoch, tick]);

  useEffect(() => {
    const controller = new AbortController();
    listDevices(controller.signal)
      .then((devices) => setHostnames(new Map(devices.map((d) => [d.id, d.hostname]))))
      .catch(() => {
        // Hostnames are a nicety; ids are shown without them.
      });
    return () => controller.abort();
  }, [epoch]);

  // Poll while the deployment can still move on its own: a fallback for missed events.
  const moving = deployment !== null && (deployment.state === "running" || deployment.state === "halted");
  useEffect(() => {
    if (!moving) return;
    const timer = setInterval(() => setTick((n) => n + 1), POLL_MS);
    return () => clearInterval(timer);
  }, [moving]);

  useDeploymentEvents((update) => {
    if (update.id !== id) return;
    setDeployment((current) =>
      current !== null && Date.parse(current.updated_at) > Date.parse(update.updated_at) ? current : update,
    );
  });

  // A target's phase and download progress come from its device's reports: re-read when a
  // target device's report of this model changes (not on every telemetry sample).
  const targetIds = useMemo(() => new Set(deployment?.targets.map((t) => t.device_id) ?? []), [deployment]);
  const lastReports = useRef(new Map<string, string>());
  useDeviceEvents((device) => {
    if (deployment === null || !targetIds.has(device.id)) return;
    const report = device.models?.[deployment.model_name];
    const signature = report
      ? `${report.release_id}:${report.phase}:${report.bytes_done}:${report.healthy}:${report.active_release ?? ""}`
      : "";
    if (lastReports.current.get(device.id) === signature) return;
    lastReports.current.set(device.id, signature);
    setTick((n) => n + 1);
  });

  async function act(action: DeploymentAction): Promise<void> {
    setActing(action);
    setActionError(null);
    try {
      setDeployment(await actOnDeployment(id, action));
    } catch (err) {
      setActionError(errorMessage(err));
    } finally {
      setActing(null);
    }
  }

  const notFound = error instanceof ApiError && error.status === 404;
  const errorText = error instanceof ApiError ? error.detail : error;
  const batches = useMemo(() => {
    const map = new Map<number, DeploymentTarget[]>();
    for (const target of deployment?.targets ?? []) {
      const list = map.get(target.batch) ?? [];
      list.push(target);
      map.set(target.batch, list);
    }
    // Batch 0 holds the targets that cannot take the release: list it last.
    const order = (batch: number): number => (batch === 0 ? Number.MAX_SAFE_INTEGER : batch);
    return [...map.entries()].sort((a, b) => order(a[0]) - order(b[0]));
  }, [deployment]);

  return (
    <div className="deployment-page">
      <title>{`Deployment ${deployment ? `${deployment.model_name} ${deployment.version}` : id} · edgefleet`}</title>
      <Link to="/deployments" className="back-link">
        ← All deployments
      </Link>
      {notFound && deployment === null ? (
        <div className="empty-state">
          <p>
            No deployment with id <code>{id}</code>.
          </p>
        </div>
      ) : (
        errorText && <Alert>{errorText}</Alert>
      )}
      {deployment === null && !error && <p className="muted loading">Loading deployment…</p>}
      {deployment !== null && (
        <>
          <header className="device-header" data-deployment-id={deployment.id}>
            <div className="device-title">
              <h1 data-testid="deployment-title">
                {deployment.model_name} {deployment.version}
              </h1>
              <DeploymentStateBadge state={deployment.state} />
              <IfRole needed="operator">
                <div className="title-actions" role="group" aria-label="Deployment actions">
                  {(["pause", "resume", "rollback"] as const).map((action) => (
                    <button
                      key={action}
                      type="button"
                      className={action === "rollback" ? "button button-danger" : "button"}
                      data-testid={`deployment-${action}`}
                      disabled={acting !== null || !canAct(deployment, action)}
                      onClick={() => void act(action)}
                    >
                      {acting === action ? `${ACTION_LABELS[action]}…` : ACTION_LABELS[action]}
                    </button>
                  ))}
                </div>
              </IfRole>
            </div>
            {actionError && (
              <p className="form-error" role="alert" data-testid="deployment-action-error">
                {actionError}
              </p>
            )}
            {deployment.detail && (
              <Alert kind={deployment.state === "halted" ? "error" : "info"}>
                <span data-testid="deployment-detail">
                  {deployment.state === "halted" ? "Halted: " : ""}
                  {deployment.detail}
                </span>
              </Alert>
            )}
            <dl className="meta">
              <div>
                <dt>Release</dt>
                <dd>
                  {deployment.release} <span className="mono small muted">{deployment.release_id}</span>
                </dd>
              </div>
              <div>
                <dt>Batch</dt>
                <dd data-testid="deployment-batch">{batchLabel(deployment)}</dd>
              </div>
              <div>
                <dt>Batch size · pause</dt>
                <dd>
                  {deployment.batch_size} · {deployment.pause_s} s
                </dd>
              </div>
              <div>
                <dt>Max failure ratio</dt>
                <dd>{deployment.max_failure_ratio}</dd>
              </div>
              <div className={deployment.canary ? "meta-wide" : undefined}>
                <dt>Canary</dt>
                <dd data-testid="deployment-canary">
                  <CanaryText canary={deployment.canary} />
                </dd>
              </div>
              {deployment.target_tag && (
                <div>
                  <dt>Targets</dt>
                  <dd>
                    tag <code>{deployment.target_tag}</code>
                  </dd>
                </div>
              )}
              {deployment.next_batch_at && deployment.state === "running" && (
                <div>
                  <dt>Next batch</dt>
                  <dd title={absoluteTime(deployment.next_batch_at)}>{untilText(deployment.next_batch_at, now)}</dd>
                </div>
              )}
              {deployment.schedules.length > 0 && (
                <div className="meta-wide">
                  <dt>Schedules</dt>
                  <dd>
                    {deployment.schedules
                      .map((sch) => `${sch.source} ${sch.path ?? sch.argv?.join(" ") ?? ""} every ${sch.interval_s} s`)
                      .join("; ")}
                  </dd>
                </div>
              )}
              <div>
                <dt>Started</dt>
                <dd title={absoluteTime(deployment.created_at)}>
                  {relativeTime(deployment.created_at, now)} by {deployment.created_by}
                </dd>
              </div>
              <div>
                <dt>Updated</dt>
                <dd title={absoluteTime(deployment.updated_at)}>{relativeTime(deployment.updated_at, now)}</dd>
              </div>
              <div>
                <dt>Results</dt>
                <dd>
                  <Link to={`/results?model=${encodeURIComponent(deployment.model_name)}`}>
                    {deployment.model_name} results
                  </Link>
                </dd>
              </div>
            </dl>
          </header>

          <section className="panel" aria-labelledby="targets-heading">
            <div className="section-header">
              <h2 id="targets-heading">Targets</h2>
              <span className="muted small">
                {deployment.targets.filter((t) => t.state === "running").length} of {deployment.targets.length} running
              </span>
            </div>
            {deployment.targets.length === 0 ? (
              <p className="muted">This deployment has no targets.</p>
            ) : (
              <div className="table-wrap">
                <table className="table targets-table" data-testid="targets-table">
                  <thead>
                    <tr>
                      <th scope="col">Device</th>
                      <th scope="col" className="num">Batch</th>
                      <th scope="col">Target state</th>
                      <th scope="col">Device phase</th>
                      <th scope="col">Download</th>
                      <th scope="col">Detail</th>
                    </tr>
                  </thead>
                  {batches.map(([batch, targets]) => (
                    <tbody key={batch} data-batch={batch}>
                      {targets.map((target) => (
                        <TargetRow key={target.device_id} target={target} hostname={hostnames.get(target.device_id)} />
                      ))}
                    </tbody>
                  ))}
                </table>
              </div>
            )}
          </section>
        </>
      )}
    </div>
  );
}
