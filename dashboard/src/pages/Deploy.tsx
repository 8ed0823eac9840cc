import { useEffect, useMemo, useState, type FormEvent } from "react";
import { Link, useNavigate, useParams } from "react-router-dom";
import { ReadOnlyNote, useAccess } from "../access";
import { ApiError, errorMessage, isAbortError, listDevices, type DevicePublic } from "../api";
import { Alert } from "../components/Alert";
import { StatusBadge } from "../components/StatusBadge";
import { TagChips } from "../components/TagChips";
import { sortDevices } from "../devices";
import { absoluteTime, bytes } from "../format";
import { buildSchedules, newScheduleRow, parseNumberField, releaseSize, validateTag, type ScheduleRow } from "../models";
import {
  CANARY_METRICS,
  createDeployment,
  getModel,
  previewDeployment,
  SCHEDULE_SOURCES,
  type CanaryMetric,
  type DeploymentCreate,
  type DeploymentPreview,
  type ModelReleasePublic,
} from "../modelsApi";

/** Route element: a fresh form per release id. */
export function DeployPage() {
  const { id = "" } = useParams();
  const { me, can } = useAccess();
  if (me !== null && !can("operator")) {
    return (
      <div className="deploy-page">
        <Link to="/models" className="back-link">
          ← All models
        </Link>
        <ReadOnlyNote needed="operator" what="deploy models" />
      </div>
    );
  }
  return <Deploy key={id} releaseId={id} />;
}

interface PlanDraft {
  mode: "devices" | "tag";
  tag: string;
  batchSize: string;
  pauseS: string;
  maxFailureRatio: string;
  canary: boolean;
  metric: CanaryMetric;
  margin: string;
  minResults: string;
}

const INITIAL: PlanDraft = {
  mode: "devices",
  tag: "",
  batchSize: "1",
  pauseS: "0",
  maxFailureRatio: "0",
  canary: false,
  metric: "error_rate",
  margin: "0.05",
  minResults: "20",
};

type BodyResult = { ok: true; body: DeploymentCreate } | { ok: false; error: string };

function buildBody(
  releaseId: string,
  draft: PlanDraft,
  selected: ReadonlySet<string>,
  schedules: readonly ScheduleRow[],
): BodyResult {
  const body: DeploymentCreate = { release_id: releaseId, batch_size: 1, pause_s: 0, max_failure_ratio: 0 };
  if (draft.mode === "devices") {
    if (selected.size === 0) return { ok: false, error: "Pick at least one device, or target a tag." };
    body.device_ids = [...selected].sort();
  } else {
    const tag = draft.tag.trim();
    const problem = validateTag(tag);
    if (problem) return { ok: false, error: problem };
    body.tag = tag;
  }
  const batch = parseNumberField(draft.batchSize, "The batch size", { min: 1, max: 10_000, integer: true, fallback: 1 });
  if (!batch.ok) return batch;
  const pause = parseNumberField(draft.pauseS, "The pause", { min: 0, max: 86_400, fallback: 0 });
  if (!pause.ok) return pause;
  const ratio = parseNumberField(draft.maxFailureRatio, "The maximum failure ratio", { min: 0, max: 1, fallback: 0 });
  if (!ratio.ok) return ratio;
  body.batch_size = batch.value;
  body.pause_s = pause.value;
  body.max_failure_ratio = ratio.value;
  if (draft.canary) {
    const margin = parseNumberField(draft.margin, "The canary margin", { min: 0, max: 1e9, fallback: Number.NaN });
    if (!margin.ok) return margin;
    if (Number.isNaN(margin.value)) return { ok: false, error: "Give the canary margin." };
    const min = parseNumberField(draft.minResults, "The canary's minimum results", {
      min: 1,
      max: 1_000_000,
      integer: true,
      fallback: 20,
    });
    if (!min.ok) return min;
    body.canary = { metric: draft.metric, margin: margin.value, min_results: min.value };
  }
  const built = buildSchedules(schedules);
  if (!built.ok) return built;
  if (built.schedules.length > 0) body.schedules = built.schedules;
  return { ok: true, body };
}

function DevicePicker(props: {
  devices: readonly DevicePublic[];
  selected: ReadonlySet<string>;
  onChange: (next: Set<string>) => void;
  disabled: boolean;
}) {
  const { devices, selected, onChange, disabled } = props;
  const toggle = (id: string, on: boolean): void => {
    const next = new Set(selected);
    if (on) next.add(id);
    else next.delete(id);
    onChange(next);
  };
  if (devices.length === 0) return <p className="muted">No devices are enrolled yet.</p>;
  return (
    <fieldset className="device-picker" disabled={disabled} data-testid="device-picker">
      <legend className="field-label">Devices</legend>
      <div className="picker-tools">
        <button type="button" className="button button-quiet" onClick={() => onChange(new Set(devices.map((d) => d.id)))}>
          Select all
        </button>
        <button type="button" className="button button-quiet" onClick={() => onChange(new Set())}>
          Clear
        </button>
        <span className="muted small">{selected.size} selected</span>
      </div>
      <ul className="picker-list">
        {devices.map((device) => (
          <li key={device.id} data-device-id={device.id}>
            <label className="checkbox">
              <input
                type="checkbox"
                name="device"
                value={device.id}
                checked={selected.has(device.id)}
                onChange={(e) => toggle(device.id, e.target.checked)}
              />
              <span className="picker-name">{device.hostname}</span>
              <StatusBadge status={device.status} />
              <span className="mono small muted">{device.id}</span>
              <TagChips tags={device.tags} />
            </label>
          </li>
        ))}
      </ul>
    </fieldset>
  );
}

function ScheduleFields(props: { rows: ScheduleRow[]; onChange: (rows: ScheduleRow[]) => void; disabled: boolean }) {
  const { rows, onChange, disabled } = props;
  const update = (id: number, patch: Partial<Omit<ScheduleRow, "id">>): void =>
    onChange(rows.map((r) => (r.id === id ? { ...r, ...patch } : r)));
  return (
    <fieldset className="schedules" disabled={disabled} data-testid="schedules">
      <legend className="field-label">Schedules (optional)</legend>
      <p className="hint">
        Run the model on the device every N seconds: on a file read afresh, each new file in a folder, the output of a
        command (on the agent's allow list), or the newest input pushed to the device's local API.
      </p>
      {rows.map((row, index) => (
        <div className="schedule-row" key={row.id} data-testid="schedule-row">
          <select
            name="schedule-source"
            aria-label={`Schedule ${index + 1} source`}
            value={row.source}
            onChange={(e) => {
              const source = SCHEDULE_SOURCES.find((s) => s === e.target.value);
              if (source) update(row.id, { source });
            }}
          >
            {SCHEDULE_SOURCES.map((s) => (
              <option key={s} value={s}>
                {s}
              </option>
            ))}
          </select>
          <input
            type="text"
            name="schedule-target"
            aria-label={`Schedule ${index + 1} ${row.source === "command" ? "command line" : "path"}`}
            placeholder={
              row.source === "command" ? "command line, e.g. cat /tmp/input.json" : row.source === "http" ? "—" : "path on the device"
            }
            disabled={row.source === "http"}
            autoComplete="off"
            value={row.source === "http" ? "" : row.target}
            onChange={(e) => update(row.id, { target: e.target.value })}
          />
          <input
            type="number"
            name="schedule-interval"
            aria-label={`Schedule ${index + 1} interval (s)`}
            min={1}
            max={86_400}
            step="any"
            value={row.interval}
            onChange={(e) => update(row.id, { interval: e.target.value })}
          />
          <button
            type="button"
            className="button button-quiet"
            aria-label={`Remove schedule ${index + 1}`}
            onClick={() => onChange(rows.filter((r) => r.id !== row.id))}
          >
            ×
          </button>
        </div>
      ))}
      <div>
        <button type="button" className="button button-quiet" onClick={() => onChange([...rows, newScheduleRow()])}>
          Add schedule
        </button>
      </div>
    </fieldset>
  );
}

function PreviewResult({ preview, names }: { preview: DeploymentPreview; names: ReadonlyMap<string, string> }) {
  const label = (id: string): string => names.get(id) ?? id;
  return (
    <div className="preview" data-testid="deploy-preview" aria-live="polite">
      <div className="preview-col" data-testid="preview-compatible" data-count={preview.compatible.length}>
        <h3>
          Compatible <span className="muted">({preview.compatible.length})</span>
        </h3>
        {preview.compatible.length === 0 ? (
          <p className="muted">None of the targets can take this model.</p>
        ) : (
          <ul>
            {preview.compatible.map((id) => (
              <li key={id} data-device-id={id}>
                <span className="text-good" aria-hidden="true">
                  ✓{" "}
                </span>
                {label(id)} <span className="mono small muted">{id}</span>
              </li>
            ))}
          </ul>
        )}
      </div>
      <div className="preview-col" data-testid="preview-incompatible" data-count={preview.incompatible.length}>
        <h3>
          Cannot take it <span className="muted">({preview.incompatible.length})</span>
        </h3>
        {preview.incompatible.length === 0 ? (
          <p className="muted">Every target fits the release's constraints.</p>
        ) : (
          <ul>
            {preview.incompatible.map((item) => (
              <li key={item.device_id} data-device-id={item.device_id}>
                <span className="text-bad" aria-hidden="true">
                  ✗{" "}
                </span>
                {label(item.device_id)} <span className="mono small muted">{item.device_id}</span>
                <ul className="reasons" data-testid="incompatible-reasons">
                  {item.reasons.map((reason) => (
                    <li key={reason}>{reason}</li>
                  ))}
                </ul>
              </li>
            ))}
          </ul>
        )}
      </div>
    </div>
  );
}

function Deploy({ releaseId }: { releaseId: string }) {
  const navigate = useNavigate();
  const [release, setRelease] = useState<ModelReleasePublic | null>(null);
  const [devices, setDevices] = useState<DevicePublic[] | null>(null);
  const [loadError, setLoadError] = useState<ApiError | string | null>(null);
  const [draft, setDraft] = useState<PlanDraft>(INITIAL);
  const [selected, setSelected] = useState<Set<string>>(new Set());
  const [schedules, setSchedules] = useState<ScheduleRow[]>([]);
  const [preview, setPreview] = useState<{ key: string; result: DeploymentPreview } | null>(null);
  const [busy, setBusy] = useState<"preview" | "deploy" | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    const controller = new AbortController();
    Promise.all([getModel(releaseId, controller.signal), listDevices(controller.signal)])
      .then(([fetched, list]) => {
        if (controller.signal.aborted) return;
        setRelease(fetched);
        setDevices(sortDevices(list));
      })
      .catch((err: unknown) => {
        if (isAbortError(err)) return;
        setLoadError(err instanceof ApiError ? err : errorMessage(err));
      });
    return () => controller.abort();
  }, [releaseId]);

  const names = useMemo(() => new Map((devices ?? []).map((d) => [d.id, d.hostname])), [devices]);
  const built = buildBody(releaseId, draft, selected, schedules);
  const bodyKey = built.ok ? JSON.stringify(built.body) : null;
  // The preview holds only for the plan it was computed for; any edit asks for a new one.
  const currentPreview = preview !== null && preview.key === bodyKey ? preview.result : null;
  const edit = (patch: Partial<PlanDraft>): void => setDraft((d) => ({ ...d, ...patch }));

  async function check(event: FormEvent<HTMLFormElement>): Promise<void> {
    event.preventDefault();
    if (!built.ok) {
      setError(built.error);
      return;
    }
    setBusy("preview");
    setError(null);
    try {
      const result = await previewDeployment(built.body);
      setPreview({ key: JSON.stringify(built.body), result });
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(null);
    }
  }

  async function confirm(): Promise<void> {
    if (!built.ok || currentPreview === null) return;
    setBusy("deploy");
    setError(null);
    try {
      const deployment = await createDeployment(built.body);
      void navigate(`/deployments/${encodeURIComponent(deployment.id)}`);
    } catch (err) {
      setError(errorMessage(err));
      setBusy(null);
    }
  }

  const notFound = loadError instanceof ApiError && loadError.status === 404;
  const loadText = loadError instanceof ApiError ? loadError.detail : loadError;
  const disabled = busy !== null;

  return (
    <div className="deploy-page">
      <title>{`Deploy ${release?.name ?? ""} · edgefleet`}</title>
      <Link to="/models" className="back-link">
        ← All models
      </Link>
      {notFound ? (
        <div className="empty-state">
          <p>
            No model release with id <code>{releaseId}</code>.
          </p>
        </div>
      ) : (
        loadText && <Alert>{loadText}</Alert>
      )}
      {release === null && loadError === null && <p className="muted loading">Loading release…</p>}
      {release !== null && (
        <>
          <header className="page-header">
            <div>
              <h1 data-testid="deploy-title">
                Deploy {release.name} {release.version}
              </h1>
              <p className="page-subtitle">
                Release {release.release} · {release.runtime} · {bytes(releaseSize(release))}
                {release.encrypted ? " · encrypted" : ""} · expires {absoluteTime(release.expires_at)}
                {release.constraints.architectures.length > 0 && ` · ${release.constraints.architectures.join(", ")} only`}
              </p>
            </div>
          </header>
          <form className="form panel deploy-form" data-testid="deploy-form" onSubmit={(e) => void check(e)}>
            <div className="segmented" role="radiogroup" aria-label="Targets">
              {(["devices", "tag"] as const).map((mode) => (
                <label key={mode} className={draft.mode === mode ? "segment active" : "segment"}>
                  <input
                    type="radio"
                    name="target-mode"
                    value={mode}
                    className="visually-hidden"
                    checked={draft.mode === mode}
                    disabled={disabled}
                    onChange={() => edit({ mode })}
                  />
                  {mode === "devices" ? "Pick devices" : "By tag"}
                </label>
              ))}
            </div>
            {draft.mode === "devices" ? (
              devices !== null && (
                <DevicePicker devices={devices} selected={selected} onChange={setSelected} disabled={disabled} />
              )
            ) : (
              <label className="field tag-field">
                <span className="field-label">Tag</span>
                <input
                  type="text"
                  name="tag"
                  placeholder="key=value"
                  autoComplete="off"
                  disabled={disabled}
                  value={draft.tag}
                  onChange={(e) => edit({ tag: e.target.value })}
                />
              </label>
            )}

            <fieldset className="field-row" disabled={disabled}>
              <label className="field">
                <span className="field-label">Batch size</span>
                <input
                  type="number"
                  name="batch_size"
                  min={1}
                  step={1}
                  value={draft.batchSize}
                  onChange={(e) => edit({ batchSize: e.target.value })}
                />
              </label>
              <label className="field">
                <span className="field-label">Pause between batches (s)</span>
                <input
                  type="number"
                  name="pause_s"
                  min={0}
                  step="any"
                  value={draft.pauseS}
                  onChange={(e) => edit({ pauseS: e.target.value })}
                />
              </label>
              <label className="field">
                <span className="field-label">Max failure ratio (0–1)</span>
                <input
                  type="number"
                  name="max_failure_ratio"
                  min={0}
                  max={1}
                  step="any"
                  value={draft.maxFailureRatio}
                  onChange={(e) => edit({ maxFailureRatio: e.target.value })}
                />
              </label>
            </fieldset>

            <fieldset className="canary" disabled={disabled}>
              <label className="checkbox">
                <input
                  type="checkbox"
                  name="canary"
                  checked={draft.canary}
                  onChange={(e) => edit({ canary: e.target.checked })}
                />
                <span>Canary gate: compare the first batch against the model it replaces</span>
              </label>
              {draft.canary && (
                <div className="field-row">
                  <label className="field">
                    <span className="field-label">Metric</span>
                    <select
                      name="canary_metric"
                      value={draft.metric}
                      onChange={(e) => {
                        const choice = CANARY_METRICS.find((m) => m.metric === e.target.value);
                        if (choice) edit({ metric: choice.metric, margin: choice.margin });
                      }}
                    >
                      {CANARY_METRICS.map((m) => (
                        <option key={m.metric} value={m.metric}>
                          {m.label}
                        </option>
                      ))}
                    </select>
                  </label>
                  <label className="field">
                    <span className="field-label">
                      Halt when worse by{" "}
                      <span className="muted small">({CANARY_METRICS.find((m) => m.metric === draft.metric)?.unit})</span>
                    </span>
                    <input
                      type="number"
                      name="canary_margin"
                      min={0}
                      step="any"
                      value={draft.margin}
                      onChange={(e) => edit({ margin: e.target.value })}
                    />
                  </label>
                  <label className="field">
                    <span className="field-label">After at least (results)</span>
                    <input
                      type="number"
                      name="canary_min_results"
                      min={1}
                      step={1}
                      value={draft.minResults}
                      onChange={(e) => edit({ minResults: e.target.value })}
                    />
                  </label>
                </div>
              )}
            </fieldset>

            <ScheduleFields rows={schedules} onChange={setSchedules} disabled={disabled} />

            <div className="form-actions">
              <button type="submit" className="button" disabled={disabled}>
                {busy === "preview" ? "Checking…" : "Check compatibility"}
              </button>
              <button
                type="button"
                className="button button-primary"
                data-testid="deploy-confirm"
                disabled={disabled || currentPreview === null || currentPreview.compatible.length === 0}
                onClick={() => void confirm()}
                title={currentPreview === null ? "Check compatibility first" : undefined}
              >
                {busy === "deploy"
                  ? "Deploying…"
                  : currentPreview === null
                    ? "Deploy"
                    : `Deploy to ${currentPreview.compatible.length} ${currentPreview.compatible.length === 1 ? "device" : "devices"}`}
              </button>
              {error && (
                <span className="form-error" role="alert" data-testid="deploy-error">
                  {error}
                </span>
              )}
            </div>
            {preview !== null && currentPreview === null && (
              <p className="hint" data-testid="preview-stale">
                The plan changed since the last check: check compatibility again before deploying.
              </p>
            )}
            {currentPreview !== null && <PreviewResult preview={currentPreview} names={names} />}
          </form>
        </>
      )}
    </div>
  );
}
