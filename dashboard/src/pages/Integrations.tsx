import { useEffect, useState, type FormEvent } from "react";
import { errorMessage, isAbortError } from "../api";
import { PageError, useAccess } from "../access";
import {
  createIntegration,
  listIntegrations,
  READ_KINDS,
  revokeIntegration,
  type IntegrationCreated,
  type IntegrationPublic,
  type ReadKind,
} from "../accessApi";
import { TAG_PATTERN } from "../commands";
import { ConfirmDialog } from "../components/ConfirmDialog";
import { RevokedBadge } from "../components/RevokedBadge";
import { CopyButton, DownloadLink, SecretOnce } from "../components/SecretOnce";
import { absoluteTime, EM_DASH, relativeTime } from "../format";
import { useNow } from "../hooks/useNow";

const NAME_PATTERN = /^[a-z0-9][a-z0-9-]{0,47}$/;

const READ_LABELS: Record<ReadKind, string> = {
  results: "inference results",
  telemetry: "telemetry",
  status: "online/offline status",
};

/** The bundle's README, as `edgefleet integrations create` writes it (same file names). */
export function bundleReadme({ integration, bundle }: IntegrationCreated): string {
  const scope = integration.tag ? `devices tagged ${integration.tag}` : "every device";
  return `# edgefleet integration \`${integration.name}\`

This bundle lets \`${integration.name}\` read device data from the edgefleet broker over MQTT with mutual TLS.
It may read: ${integration.read.join(", ")} (${scope}). It cannot publish anything, and it cannot read anything else.

Files:
- \`client.crt\`, \`client.key\`: this integration's identity (${integration.identity}). Keep the key secret
  (\`chmod 600 client.key\`); edgefleet does not keep it: if it is lost, create a new integration.
- \`ca.crt\`: the fleet CA, to verify the broker.
- \`bundle.json\`: broker address, topics and certificate expiry, for programs.

Broker: \`mqtts://${bundle.broker_host}:${bundle.broker_port}\` (MQTT 3.1.1 or 5, TLS 1.2+). The certificate's name is the
client id: one connection at a time; a second one takes over the first.

Topics to subscribe to:
${bundle.topics.map((t) => `- \`${t}\``).join("\n")}

Try it (in the directory holding these files):

    ${bundle.mosquitto_sub}

The certificate expires on ${integration.cert_not_after}. An administrator can revoke it at any time
(dashboard, or \`edgefleet integrations revoke ${integration.name}\`); the connection is then closed and refused.
`;
}

function bundleJson({ integration, bundle }: IntegrationCreated): string {
  const meta = {
    name: integration.name,
    identity: integration.identity,
    broker_host: bundle.broker_host,
    broker_port: bundle.broker_port,
    topics: bundle.topics,
    read: integration.read,
    tag: integration.tag,
    cert_not_after: integration.cert_not_after,
  };
  return `${JSON.stringify(meta, null, 2)}\n`;
}

/** The one-time bundle: downloads built here from the answer, and the mosquitto_sub line. */
function BundlePanel({ created, onDone }: { created: IntegrationCreated; onDone: () => void }) {
  const { integration, bundle } = created;
  return (
    <SecretOnce title={`Bundle of integration ${integration.name}`} onDone={onDone} testId="integration-bundle">
      <p>
        Hand these files to the system that reads the data. The private key is in <code>client.key</code>{" "}
        and nowhere else.
      </p>
      <div className="download-row" aria-label="Bundle files">
        <DownloadLink filename="client.crt" text={bundle.cert_pem} type="application/x-pem-file" />
        <DownloadLink filename="client.key" text={bundle.key_pem} type="application/x-pem-file" />
        <DownloadLink filename="ca.crt" text={bundle.ca_pem} type="application/x-pem-file" />
        <DownloadLink filename="bundle.json" text={bundleJson(created)} type="application/json" />
        <DownloadLink filename="README.md" text={bundleReadme(created)} type="text/markdown" />
      </div>
      <dl className="meta">
        <div>
          <dt>Broker</dt>
          <dd className="mono">
            {bundle.broker_host}:{bundle.broker_port}
          </dd>
        </div>
        <div>
          <dt>Certificate expires</dt>
          <dd>{absoluteTime(integration.cert_not_after)}</dd>
        </div>
        <div className="meta-wide">
          <dt>Topics (read only)</dt>
          <dd className="mono small" data-testid="bundle-topics">
            {bundle.topics.join("  ")}
          </dd>
        </div>
      </dl>
      <div className="secret-value">
        <span className="field-label">Try it with mosquitto_sub</span>
        <div className="secret-row">
          <code className="secret-text" data-testid="bundle-mosquitto-sub">
            {bundle.mosquitto_sub}
          </code>
          <CopyButton value={bundle.mosquitto_sub} />
        </div>
      </div>
    </SecretOnce>
  );
}

function CreateIntegrationForm({ onCreated }: { onCreated: (created: IntegrationCreated) => void }) {
  const [name, setName] = useState("");
  const [read, setRead] = useState<Set<ReadKind>>(() => new Set<ReadKind>(["results"]));
  const [tag, setTag] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);

  function toggle(kind: ReadKind, on: boolean): void {
    setRead((current) => {
      const next = new Set(current);
      if (on) next.add(kind);
      else next.delete(kind);
      return next;
    });
  }

  async function submit(event: FormEvent<HTMLFormElement>): Promise<void> {
    event.preventDefault();
    const trimmedName = name.trim();
    const trimmedTag = tag.trim();
    if (!NAME_PATTERN.test(trimmedName)) {
      setError("A name is 1-48 lowercase letters, digits or '-', starting with a letter or digit.");
      return;
    }
    if (read.size === 0) {
      setError("Grant at least one kind of data to read.");
      return;
    }
    if (trimmedTag !== "" && !TAG_PATTERN.test(trimmedTag)) {
      setError("Give the tag as key=value, e.g. site=lab, or leave it empty for every device.");
      return;
    }
    setBusy(true);
    setError(null);
    try {
      const kinds = READ_KINDS.filter((k) => read.has(k));
      onCreated(await createIntegration({ name: trimmedName, read: kinds, ...(trimmedTag ? { tag: trimmedTag } : {}) }));
      setName("");
      setTag("");
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  }

  return (
    <form className="form" data-testid="integration-form" onSubmit={(e) => void submit(e)}>
      <h2>Create an integration</h2>
      <fieldset className="field-row" disabled={busy}>
        <label className="field">
          <span className="field-label">Name</span>
          <input name="name" type="text" autoComplete="off" required value={name} onChange={(e) => setName(e.target.value)} />
        </label>
        <label className="field">
          <span className="field-label">Only devices tagged (optional)</span>
          <input name="tag" type="text" placeholder="site=lab" autoComplete="off" value={tag} onChange={(e) => setTag(e.target.value)} />
        </label>
      </fieldset>
      <fieldset className="checkbox-group" disabled={busy}>
        <legend className="field-label">May read</legend>
        {READ_KINDS.map((kind) => (
          <label key={kind} className="checkbox">
            <input
              type="checkbox"
              name={`read-${kind}`}
              checked={read.has(kind)}
              onChange={(e) => toggle(kind, e.target.checked)}
            />
            {READ_LABELS[kind]} <span className="muted small">({kind})</span>
          </label>
        ))}
      </fieldset>
      <p className="hint">
        The integration gets a client certificate for the MQTT broker: read-only on the granted topics of
        the granted devices, nothing else.
      </p>
      <div className="form-actions">
        <button type="submit" className="button button-primary" disabled={busy}>
          {busy ? "Creating…" : "Create integration"}
        </button>
        {error && (
          <span className="form-error" role="alert" data-testid="integration-error">
            {error}
          </span>
        )}
      </div>
    </form>
  );
}

/** Third-party readers over MQTT [admin]: create (the key is shown once), list, revoke. */
export function Integrations() {
  const { isAdmin } = useAccess();
  const now = useNow(30_000);
  const [integrations, setIntegrations] = useState<IntegrationPublic[] | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [created, setCreated] = useState<IntegrationCreated | null>(null);
  const [revoking, setRevoking] = useState<IntegrationPublic | null>(null);

  useEffect(() => {
    const controller = new AbortController();
    listIntegrations(controller.signal)
      .then((list) => {
        setIntegrations(list);
        setError(null);
      })
      .catch((err: unknown) => {
        if (!isAbortError(err)) setError(err);
      });
    return () => controller.abort();
  }, []);

  function upsert(integration: IntegrationPublic): void {
    setIntegrations((current) => {
      const list = current ?? [];
      return list.some((i) => i.id === integration.id)
        ? list.map((i) => (i.id === integration.id ? integration : i))
        : [integration, ...list];
    });
  }

  return (
    <div className="integrations-page">
      <title>Integrations · edgefleet</title>
      <div className="page-header">
        <div>
          <h1>Integrations</h1>
          <p className="page-subtitle">Outside systems that read device data straight from the MQTT broker.</p>
        </div>
      </div>
      <PageError error={error} />
      {created && <BundlePanel created={created} onDone={() => setCreated(null)} />}
      {integrations === null && error === null && <p className="muted loading">Loading integrations…</p>}
      {integrations !== null && integrations.length === 0 && (
        <div className="empty-state" data-testid="integrations-empty">
          <p>No integrations yet.</p>
        </div>
      )}
      {integrations !== null && integrations.length > 0 && (
        <div className="table-wrap">
          <table className="table" data-testid="integrations-table">
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Reads</th>
                <th scope="col">Devices</th>
                <th scope="col">Certificate expires</th>
                <th scope="col">Created</th>
                <th scope="col">State</th>
                <th scope="col">
                  <span className="visually-hidden">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {integrations.map((i) => (
                <tr key={i.id} data-integration-id={i.id} data-integration-name={i.name}>
                  <td>
                    <span className="mono">{i.name}</span>
                    <div className="muted small mono">{i.identity}</div>
                  </td>
                  <td>{i.read.join(", ")}</td>
                  <td className="mono">{i.tag ?? "all"}</td>
                  <td className="nowrap">{absoluteTime(i.cert_not_after)}</td>
                  <td className="nowrap muted" title={absoluteTime(i.created_at)}>
                    {relativeTime(i.created_at, now)} by {i.created_by}
                  </td>
                  <td data-testid="integration-state">
                    {i.revoked_at ? <RevokedBadge at={i.revoked_at} /> : <span className="badge tone-good">active</span>}
                  </td>
                  <td className="nowrap">
                    {!i.revoked_at && isAdmin ? (
                      <button type="button" className="button button-danger" onClick={() => setRevoking(i)}>
                        Revoke…
                      </button>
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
      {isAdmin && (
        <section className="panel">
          <CreateIntegrationForm
            onCreated={(result) => {
              setCreated(result);
              upsert(result.integration);
            }}
          />
        </section>
      )}
      <ConfirmDialog
        open={revoking !== null}
        title={`Revoke integration ${revoking?.name ?? ""}?`}
        confirmLabel="Revoke integration"
        testId="revoke-integration-dialog"
        onClose={() => setRevoking(null)}
        onConfirm={async () => {
          if (revoking) upsert(await revokeIntegration(revoking.id));
        }}
      >
        <p>
          Its certificate goes on the revocation list and its grants leave the broker's ACL; the broker
          drops its connection and refuses it from now on. Its name cannot be reused.
        </p>
      </ConfirmDialog>
    </div>
  );
}
