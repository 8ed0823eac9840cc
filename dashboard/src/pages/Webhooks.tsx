import { useEffect, useState, type FormEvent } from "react";
import { Link, useParams } from "react-router-dom";
import { errorMessage, isAbortError } from "../api";
import { PageError, useAccess } from "../access";
import {
  createWebhook,
  disableWebhook,
  listDeliveries,
  listWebhooks,
  type DeliveryPublic,
  type DeliveryState,
  type WebhookCreated,
  type WebhookPublic,
} from "../accessApi";
import { TAG_PATTERN } from "../commands";
import { ConfirmDialog } from "../components/ConfirmDialog";
import { SecretOnce, SecretValue } from "../components/SecretOnce";
import { absoluteTime, EM_DASH, relativeTime } from "../format";
import { useNow } from "../hooks/useNow";
import { MODEL_NAME_PATTERN } from "../models";

const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
/** Deliveries shown in the log. */
const DELIVERY_LIMIT = 200;
/** The log is re-read this often while the page is open (deliveries happen in the background). */
const DELIVERY_POLL_MS = 5_000;

const DELIVERY_TONE: Record<DeliveryState, string> = {
  pending: "tone-busy",
  delivered: "tone-good",
  failed: "tone-bad",
  cancelled: "tone-idle",
};

function CreateWebhookForm({ onCreated }: { onCreated: (created: WebhookCreated) => void }) {
  const [name, setName] = useState("");
  const [url, setUrl] = useState("");
  const [models, setModels] = useState("");
  const [tag, setTag] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);

  async function submit(event: FormEvent<HTMLFormElement>): Promise<void> {
    event.preventDefault();
    const trimmedName = name.trim();
    const trimmedUrl = url.trim();
    const trimmedTag = tag.trim();
    const modelList = models
      .split(/[\s,]+/)
      .map((m) => m.trim())
      .filter((m) => m !== "");
    if (!NAME_PATTERN.test(trimmedName)) {
      setError("A name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit.");
      return;
    }
    const badModel = modelList.find((m) => !MODEL_NAME_PATTERN.test(m));
    if (badModel !== undefined) {
      setError(`"${badModel}" is not a model name (lowercase letters, digits, '_' and '-').`);
      return;
    }
    if (trimmedTag !== "" && !TAG_PATTERN.test(trimmedTag)) {
      setError("Give the tag as key=value, e.g. site=lab, or leave it empty for every device.");
      return;
    }
    setBusy(true);
    setError(null);
    try {
      onCreated(
        await createWebhook({
          name: trimmedName,
          url: trimmedUrl,
          models: modelList,
          ...(trimmedTag ? { tag: trimmedTag } : {}),
        }),
      );
      setName("");
      setUrl("");
      setModels("");
      setTag("");
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  }

  return (
    <form className="form" data-testid="webhook-form" onSubmit={(e) => void submit(e)}>
      <h2>Add a webhook</h2>
      <fieldset className="field-row" disabled={busy}>
        <label className="field">
          <span className="field-label">Name</span>
          <input name="name" type="text" autoComplete="off" required value={name} onChange={(e) => setName(e.target.value)} />
        </label>
        <label className="field field-wide">
          <span className="field-label">URL</span>
          <input
            name="url"
            type="text"
            inputMode="url"
            placeholder="https://example.com/edgefleet"
            autoComplete="off"
            required
            value={url}
            onChange={(e) => setUrl(e.target.value)}
          />
        </label>
        <label className="field">
          <span className="field-label">Only these models (optional)</span>
          <input name="models" type="text" placeholder="detector, classifier" autoComplete="off" value={models} onChange={(e) => setModels(e.target.value)} />
        </label>
        <label className="field">
          <span className="field-label">Only devices tagged (optional)</span>
          <input name="tag" type="text" placeholder="site=lab" autoComplete="off" value={tag} onChange={(e) => setTag(e.target.value)} />
        </label>
      </fieldset>
      <p className="hint">
        Each inference result is POSTed as JSON, signed with HMAC-SHA256 of <code>timestamp.body</code> under
        the secret, and retried with backoff until the endpoint answers 2xx.
      </p>
      <div className="form-actions">
        <button type="submit" className="button button-primary" disabled={busy}>
          {busy ? "Adding…" : "Add webhook"}
        </button>
        {error && (
          <span className="form-error" role="alert" data-testid="webhook-error">
            {error}
          </span>
        )}
      </div>
    </form>
  );
}

/** Result forwarding to HTTP endpoints [admin]: add (the secret is shown once), list, disable. */
export function Webhooks() {
  const { isAdmin } = useAccess();
  const now = useNow(30_000);
  const [webhooks, setWebhooks] = useState<WebhookPublic[] | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [created, setCreated] = useState<WebhookCreated | null>(null);
  const [disabling, setDisabling] = useState<WebhookPublic | null>(null);

  useEffect(() => {
    const controller = new AbortController();
    listWebhooks(controller.signal)
      .then((list) => {
        setWebhooks(list);
        setError(null);
      })
      .catch((err: unknown) => {
        if (!isAbortError(err)) setError(err);
      });
    return () => controller.abort();
  }, []);

  function upsert(webhook: WebhookPublic): void {
    setWebhooks((current) => {
      const list = current ?? [];
      return list.some((w) => w.id === webhook.id) ? list.map((w) => (w.id === webhook.id ? webhook : w)) : [webhook, ...list];
    });
  }

  return (
    <div className="webhooks-page">
      <title>Webhooks · edgefleet</title>
      <div className="page-header">
        <div>
          <h1>Webhooks</h1>
          <p className="page-subtitle">Inference results forwarded to HTTP endpoints, for systems that do not speak MQTT.</p>
        </div>
      </div>
      <PageError error={error} />
      {created && (
        <SecretOnce title={`Signing secret of webhook ${created.webhook.name}`} onDone={() => setCreated(null)}>
          <p>
            The receiver checks the <code>X-Edgefleet-Signature</code> header of each POST with this secret.
          </p>
          <SecretValue label="Secret" value={created.secret} testId="created-secret" />
        </SecretOnce>
      )}
      {webhooks === null && error === null && <p className="muted loading">Loading webhooks…</p>}
      {webhooks !== null && webhooks.length === 0 && (
        <div className="empty-state" data-testid="webhooks-empty">
          <p>No webhooks yet.</p>
        </div>
      )}
      {webhooks !== null && webhooks.length > 0 && (
        <div className="table-wrap">
          <table className="table" data-testid="webhooks-table">
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">URL</th>
                <th scope="col">Models</th>
                <th scope="col">Devices</th>
                <th scope="col">State</th>
                <th scope="col">Created</th>
                <th scope="col">
                  <span className="visually-hidden">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {webhooks.map((w) => (
                <tr key={w.id} data-webhook-id={w.id} data-webhook-name={w.name}>
                  <td>
                    <Link to={`/webhooks/${encodeURIComponent(w.id)}`} className="device-link" data-testid="webhook-link">
                      {w.name}
                    </Link>
                  </td>
                  <td className="mono small webhook-url">{w.url}</td>
                  <td className="mono small">{w.models.length > 0 ? w.models.join(", ") : "all"}</td>
                  <td className="mono">{w.tag ?? "all"}</td>
                  <td data-testid="webhook-state">
                    {w.enabled ? (
                      <span className="badge tone-good">enabled</span>
                    ) : (
                      <span className="badge tone-idle" title={`Disabled ${absoluteTime(w.disabled_at)}`}>
                        disabled
                      </span>
                    )}
                  </td>
                  <td className="nowrap muted" title={absoluteTime(w.created_at)}>
                    {relativeTime(w.created_at, now)} by {w.created_by}
                  </td>
                  <td className="nowrap">
                    <span className="row-actions">
                      <Link className="button button-quiet" to={`/webhooks/${encodeURIComponent(w.id)}`}>
                        Deliveries
                      </Link>
                      {w.enabled && isAdmin && (
                        <button type="button" className="button button-danger" onClick={() => setDisabling(w)}>
                          Disable…
                        </button>
                      )}
                    </span>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {isAdmin && (
        <section className="panel">
          <CreateWebhookForm
            onCreated={(result) => {
              setCreated(result);
              upsert(result.webhook);
            }}
          />
        </section>
      )}
      <ConfirmDialog
        open={disabling !== null}
        title={`Disable webhook ${disabling?.name ?? ""}?`}
        confirmLabel="Disable webhook"
        testId="disable-webhook-dialog"
        onClose={() => setDisabling(null)}
        onConfirm={async () => {
          if (disabling) upsert(await disableWebhook(disabling.id));
        }}
      >
        <p>Nothing more is posted to it; its pending deliveries are cancelled. Its delivery log stays.</p>
      </ConfirmDialog>
    </div>
  );
}

/** Route element: the delivery log of one webhook. */
export function WebhookDeliveriesPage() {
  const { id = "" } = useParams();
  return <WebhookDeliveries key={id} id={id} />;
}

function WebhookDeliveries({ id }: { id: string }) {
  const now = useNow(5_000);
  const [webhook, setWebhook] = useState<WebhookPublic | null>(null);
  const [deliveries, setDeliveries] = useState<DeliveryPublic[] | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [tick, setTick] = useState(0);

  useEffect(() => {
    const controller = new AbortController();
    listWebhooks(controller.signal)
      .then((list) => setWebhook(list.find((w) => w.id === id) ?? null))
      .catch(() => {
        // The name is a nicety; the log below says what went wrong.
      });
    return () => controller.abort();
  }, [id]);

  useEffect(() => {
    const controller = new AbortController();
    listDeliveries(id, DELIVERY_LIMIT, controller.signal)
      .then((list) => {
        setDeliveries(list);
        setError(null);
      })
      .catch((err: unknown) => {
        if (!isAbortError(err)) setError(err);
      });
    const timer = setTimeout(() => setTick((n) => n + 1), DELIVERY_POLL_MS);
    return () => {
      clearTimeout(timer);
      controller.abort();
    };
  }, [id, tick]);

  return (
    <div className="webhook-deliveries-page">
      <title>{`Deliveries of ${webhook?.name ?? id} · edgefleet`}</title>
      <Link to="/webhooks" className="back-link">
        ← All webhooks
      </Link>
      <div className="page-header">
        <div>
          <h1 data-testid="webhook-title">Deliveries of {webhook?.name ?? id}</h1>
          {webhook && (
            <p className="page-subtitle mono">
              {webhook.url} {webhook.enabled ? "" : "· disabled"}
            </p>
          )}
        </div>
        <div className="page-tools">
          <button type="button" className="button" onClick={() => setTick((n) => n + 1)}>
            Refresh
          </button>
        </div>
      </div>
      <PageError error={error} />
      {deliveries === null && error === null && <p className="muted loading">Loading deliveries…</p>}
      {deliveries !== null && deliveries.length === 0 && (
        <div className="empty-state" data-testid="deliveries-empty">
          <p>Nothing delivered yet: a delivery is queued for each matching result from now on.</p>
        </div>
      )}
      {deliveries !== null && deliveries.length > 0 && (
        <div className="table-wrap">
          <table className="table" data-testid="deliveries-table">
            <thead>
              <tr>
                <th scope="col" className="num">
                  #
                </th>
                <th scope="col">Result</th>
                <th scope="col">State</th>
                <th scope="col" className="num">
                  Attempts
                </th>
                <th scope="col">Last answer</th>
                <th scope="col">Queued</th>
                <th scope="col">Delivered / next attempt</th>
              </tr>
            </thead>
            <tbody>
              {deliveries.map((d) => (
                <tr key={d.id} data-delivery-id={d.id} data-state={d.state}>
                  <td className="num">{d.id}</td>
                  <td className="mono small">{d.message_id}</td>
                  <td data-testid="delivery-state">
                    <span className={`badge ${DELIVERY_TONE[d.state]}`}>{d.state}</span>
                  </td>
                  <td className="num" data-testid="delivery-attempts">
                    {d.attempts}
                  </td>
                  <td className="small" data-testid="delivery-last">
                    {d.last_status !== null && <span className="mono">HTTP {d.last_status}</span>}
                    {d.last_error && <span className="text-bad"> {d.last_error}</span>}
                    {d.last_status === null && !d.last_error && EM_DASH}
                  </td>
                  <td className="nowrap" title={absoluteTime(d.created_at)}>
                    {relativeTime(d.created_at, now)}
                  </td>
                  <td className="nowrap">
                    {d.delivered_at ? (
                      <span title={absoluteTime(d.delivered_at)}>{relativeTime(d.delivered_at, now)}</span>
                    ) : d.next_attempt_at ? (
                      <span title={absoluteTime(d.next_attempt_at)}>next {absoluteTime(d.next_attempt_at)}</span>
                    ) : (
                      EM_DASH
                    )}
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
