import { useEffect, useState, type FormEvent } from "react";
import {
  errorMessage,
  getDesired,
  isAbortError,
  LOG_LEVELS,
  putDesired,
  type DesiredPublic,
  type DevicePublic,
  type LogLevel,
  type RuntimeConfig,
} from "../api";
import { IfRole } from "../access";
import { absoluteTime, EM_DASH } from "../format";
import { useLive } from "../live";
import { isLogLevel } from "../logs";
import { Alert } from "./Alert";
import { ConfigSync } from "./ConfigSync";

const MIN_INTERVAL_S = 1;
const MAX_INTERVAL_S = 86_400;

/** The form's text; "" means "leave the agent's own value" (null). */
interface DesiredForm {
  interval: string;
  logLevel: LogLevel | "";
  forwardLevel: LogLevel | "";
}

function formFromConfig(config: RuntimeConfig | undefined): DesiredForm {
  return {
    interval: config?.telemetry_interval_s == null ? "" : String(config.telemetry_interval_s),
    logLevel: config?.log_level ?? "",
    forwardLevel: config?.log_forward_level ?? "",
  };
}

type ConfigResult = { ok: true; config: RuntimeConfig } | { ok: false; error: string };

function configFromForm(form: DesiredForm): ConfigResult {
  let interval: number | null = null;
  if (form.interval.trim() !== "") {
    interval = Number(form.interval);
    if (!Number.isFinite(interval) || interval < MIN_INTERVAL_S || interval > MAX_INTERVAL_S) {
      return { ok: false, error: `The telemetry interval must be between ${MIN_INTERVAL_S} and ${MAX_INTERVAL_S} s.` };
    }
  }
  return {
    ok: true,
    config: {
      telemetry_interval_s: interval,
      log_level: form.logLevel === "" ? null : form.logLevel,
      log_forward_level: form.forwardLevel === "" ? null : form.forwardLevel,
    },
  };
}

function LevelSelect(props: { name: string; label: string; value: LogLevel | ""; onChange: (v: LogLevel | "") => void }) {
  const { name, label, value, onChange } = props;
  return (
    <label className="field">
      <span className="field-label">{label}</span>
      <select
        name={name}
        value={value}
        onChange={(e) => {
          const next = e.target.value;
          onChange(isLogLevel(next) ? next : "");
        }}
      >
        <option value="">agent default</option>
        {LOG_LEVELS.map((level) => (
          <option key={level} value={level}>
            {level}
          </option>
        ))}
      </select>
    </label>
  );
}

function appliedText(device: DevicePublic): string {
  if (device.reported_applied === null) return EM_DASH;
  return device.reported_applied ? "applied" : "not applied";
}

/** The device's desired runtime config, how far it has applied it, and a form to change it. */
export function DesiredPanel({ device }: { device: DevicePublic }) {
  const { epoch } = useLive();
  const [desired, setDesired] = useState<DesiredPublic | null>(null);
  const [error, setError] = useState<string | null>(null);
  // null until the operator edits; until then the form shows the stored desired config.
  const [edited, setEdited] = useState<DesiredForm | null>(null);
  const [saving, setSaving] = useState(false);
  const [saveError, setSaveError] = useState<string | null>(null);

  // Re-read on (re)connect and whenever the device's desired generation moves (another operator,
  // a tag-wide change, or our own save).
  const desiredGeneration = device.desired_generation;
  useEffect(() => {
    const controller = new AbortController();
    getDesired(device.id, controller.signal)
      .then((fetched) => {
        if (controller.signal.aborted) return;
        // A save answered meanwhile may already hold a newer generation.
        setDesired((current) => (current !== null && current.generation > fetched.generation ? current : fetched));
        setError(null);
      })
      .catch((err: unknown) => {
        if (isAbortError(err)) return;
        setError(errorMessage(err));
      });
    return () => controller.abort();
  }, [device.id, epoch, desiredGeneration]);

  const form = edited ?? formFromConfig(desired?.config);
  const edit = (patch: Partial<DesiredForm>): void => setEdited({ ...form, ...patch });

  async function submit(event: FormEvent<HTMLFormElement>): Promise<void> {
    event.preventDefault();
    const built = configFromForm(form);
    if (!built.ok) {
      setSaveError(built.error);
      return;
    }
    setSaving(true);
    setSaveError(null);
    try {
      setDesired(await putDesired(device.id, built.config));
      setEdited(null);
    } catch (err) {
      setSaveError(errorMessage(err));
    } finally {
      setSaving(false);
    }
  }

  const generation = Math.max(desired?.generation ?? 0, device.desired_generation);

  return (
    <section className="panel desired-panel" aria-labelledby="desired-heading" data-testid="desired-panel">
      <div className="section-header">
        <h2 id="desired-heading">Desired state</h2>
        <ConfigSync device={{ ...device, desired_generation: generation }} />
      </div>
      {error && <Alert>{error}</Alert>}
      <dl className="meta desired-meta">
        <div>
          <dt>Desired generation</dt>
          <dd data-testid="desired-generation">{generation}</dd>
        </div>
        <div>
          <dt>Reported generation</dt>
          <dd data-testid="reported-generation">{device.reported_generation ?? EM_DASH}</dd>
        </div>
        <div>
          <dt>Applied</dt>
          <dd data-testid="reported-applied" title={device.reported_detail ?? undefined}>
            {appliedText(device)}
          </dd>
        </div>
        <div>
          <dt>Changed</dt>
          <dd>{absoluteTime(desired?.updated_at)}</dd>
        </div>
        {device.reported_detail && (
          <div className="meta-wide">
            <dt>Device says</dt>
            <dd data-testid="reported-detail">{device.reported_detail}</dd>
          </div>
        )}
      </dl>
      <IfRole needed="operator" what="change the desired state">
        <form className="form desired-form" data-testid="desired-form" onSubmit={(e) => void submit(e)}>
          <fieldset className="field-row" disabled={saving || desired === null}>
            <label className="field">
              <span className="field-label">Telemetry interval (s)</span>
              <input
                type="number"
                name="telemetry_interval_s"
                min={MIN_INTERVAL_S}
                max={MAX_INTERVAL_S}
                step="any"
                placeholder="agent default"
                value={form.interval}
                onChange={(e) => edit({ interval: e.target.value })}
              />
            </label>
            <LevelSelect name="log_level" label="Log level" value={form.logLevel} onChange={(v) => edit({ logLevel: v })} />
            <LevelSelect
              name="log_forward_level"
              label="Forward logs at or above"
              value={form.forwardLevel}
              onChange={(v) => edit({ forwardLevel: v })}
            />
          </fieldset>
          <div className="form-actions">
            <button type="submit" className="button button-primary" disabled={saving || desired === null}>
              {saving ? "Saving…" : "Save desired state"}
            </button>
            {edited !== null && !saving && (
              <button type="button" className="button button-quiet" onClick={() => setEdited(null)}>
                Reset
              </button>
            )}
            {saveError && (
              <span className="form-error" role="alert" data-testid="desired-error">
                {saveError}
              </span>
            )}
          </div>
        </form>
      </IfRole>
    </section>
  );
}
