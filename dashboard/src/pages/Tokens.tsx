import { useEffect, useState, type FormEvent } from "react";
import { errorMessage, isAbortError } from "../api";
import { PageError, useAccess } from "../access";
import {
  createToken,
  listTokens,
  revokeToken,
  ROLES,
  type ApiTokenCreated,
  type ApiTokenPublic,
  type Role,
  type TokenState,
} from "../accessApi";
import { TAG_PATTERN } from "../commands";
import { ConfirmDialog } from "../components/ConfirmDialog";
import { SecretOnce, SecretValue } from "../components/SecretOnce";
import { absoluteTime, EM_DASH, relativeTime } from "../format";
import { useNow } from "../hooks/useNow";

const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
const DURATION_PATTERN = /^\d+[smhd]$/;
const EXPIRY_CHOICES = ["7d", "30d", "90d", "365d"] as const;

const STATE_TONE: Record<TokenState, string> = { active: "tone-good", expired: "tone-idle", revoked: "tone-bad" };

function CreateTokenForm({ onCreated }: { onCreated: (created: ApiTokenCreated) => void }) {
  const [name, setName] = useState("");
  const [role, setRole] = useState<Role>("viewer");
  const [tag, setTag] = useState("");
  const [expiresIn, setExpiresIn] = useState("90d");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);

  async function submit(event: FormEvent<HTMLFormElement>): Promise<void> {
    event.preventDefault();
    const trimmedName = name.trim();
    const trimmedTag = tag.trim();
    const expiry = expiresIn.trim();
    if (!NAME_PATTERN.test(trimmedName)) {
      setError("A token name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit.");
      return;
    }
    if (trimmedTag !== "" && !TAG_PATTERN.test(trimmedTag)) {
      setError("Give the tag as key=value, e.g. site=lab, or leave it empty for every device.");
      return;
    }
    if (!DURATION_PATTERN.test(expiry)) {
      setError("Give the lifetime as a number and s, m, h or d, e.g. 90d.");
      return;
    }
    setBusy(true);
    setError(null);
    try {
      onCreated(
        await createToken({ name: trimmedName, role, expires_in: expiry, ...(trimmedTag ? { tag: trimmedTag } : {}) }),
      );
      setName("");
      setTag("");
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  }

  return (
    <form className="form" data-testid="token-form" onSubmit={(e) => void submit(e)}>
      <h2>Create an API token</h2>
      <fieldset className="field-row" disabled={busy}>
        <label className="field">
          <span className="field-label">Name</span>
          <input name="name" type="text" autoComplete="off" required value={name} onChange={(e) => setName(e.target.value)} />
        </label>
        <label className="field">
          <span className="field-label">Role</span>
          <select name="role" value={role} onChange={(e) => setRole(e.target.value as Role)}>
            {ROLES.map((r) => (
              <option key={r} value={r}>
                {r}
              </option>
            ))}
          </select>
        </label>
        <label className="field">
          <span className="field-label">Only devices tagged (optional)</span>
          <input name="tag" type="text" placeholder="site=lab" autoComplete="off" value={tag} onChange={(e) => setTag(e.target.value)} />
        </label>
        <label className="field">
          <span className="field-label">Expires in</span>
          <input name="expires_in" type="text" list="token-expiry" required value={expiresIn} onChange={(e) => setExpiresIn(e.target.value)} />
          <datalist id="token-expiry">
            {EXPIRY_CHOICES.map((c) => (
              <option key={c} value={c} />
            ))}
          </datalist>
        </label>
      </fieldset>
      <p className="hint">
        Automation sends the secret as <code>Authorization: Bearer eft_…</code>. A tagged token sees only
        the devices carrying its tag and cannot use fleet-wide admin routes.
      </p>
      <div className="form-actions">
        <button type="submit" className="button button-primary" disabled={busy}>
          {busy ? "Creating…" : "Create token"}
        </button>
        {error && (
          <span className="form-error" role="alert" data-testid="token-error">
            {error}
          </span>
        )}
      </div>
    </form>
  );
}

/** API tokens for automation [admin]: create (the secret is shown once), list, revoke. */
export function Tokens() {
  const { isAdmin } = useAccess();
  const now = useNow(30_000);
  const [tokens, setTokens] = useState<ApiTokenPublic[] | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [created, setCreated] = useState<ApiTokenCreated | null>(null);
  const [revoking, setRevoking] = useState<ApiTokenPublic | null>(null);

  useEffect(() => {
    const controller = new AbortController();
    listTokens(controller.signal)
      .then((list) => {
        setTokens(list);
        setError(null);
      })
      .catch((err: unknown) => {
        if (!isAbortError(err)) setError(err);
      });
    return () => controller.abort();
  }, []);

  function upsert(token: ApiTokenPublic): void {
    setTokens((current) => {
      const list = current ?? [];
      return list.some((t) => t.id === token.id) ? list.map((t) => (t.id === token.id ? token : t)) : [token, ...list];
    });
  }

  return (
    <div className="tokens-page">
      <title>API tokens · edgefleet</title>
      <div className="page-header">
        <div>
          <h1>API tokens</h1>
          <p className="page-subtitle">Bearer tokens for scripts and other systems, each with a role, an optional tag and an expiry.</p>
        </div>
      </div>
      <PageError error={error} />
      {created && (
        <SecretOnce title={`Secret of token ${created.token.name}`} onDone={() => setCreated(null)}>
          <p>
            Role {created.token.role}
            {created.token.tag ? `, devices tagged ${created.token.tag}` : ", every device"}; expires{" "}
            {absoluteTime(created.token.expires_at)}.
          </p>
          <SecretValue label="Secret" value={created.secret} testId="created-secret" />
        </SecretOnce>
      )}
      {tokens === null && error === null && <p className="muted loading">Loading tokens…</p>}
      {tokens !== null && tokens.length === 0 && (
        <div className="empty-state" data-testid="tokens-empty">
          <p>No API tokens yet.</p>
        </div>
      )}
      {tokens !== null && tokens.length > 0 && (
        <div className="table-wrap">
          <table className="table" data-testid="tokens-table">
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Role</th>
                <th scope="col">Tag</th>
                <th scope="col">State</th>
                <th scope="col">Expires</th>
                <th scope="col">Last used</th>
                <th scope="col">Created</th>
                <th scope="col">
                  <span className="visually-hidden">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {tokens.map((token) => (
                <tr key={token.id} data-token-id={token.id} data-token-name={token.name}>
                  <td className="mono">{token.name}</td>
                  <td>{token.role}</td>
                  <td className="mono">{token.tag ?? EM_DASH}</td>
                  <td data-testid="token-state">
                    <span className={`badge ${STATE_TONE[token.state]}`}>{token.state}</span>
                  </td>
                  <td className="nowrap">{absoluteTime(token.expires_at)}</td>
                  <td className="nowrap" title={absoluteTime(token.last_used_at)}>
                    {token.last_used_at ? relativeTime(token.last_used_at, now) : "never"}
                  </td>
                  <td className="nowrap muted" title={absoluteTime(token.created_at)}>
                    {relativeTime(token.created_at, now)} by {token.created_by}
                  </td>
                  <td className="nowrap">
                    {token.state === "active" && isAdmin && (
                      <button type="button" className="button button-danger" onClick={() => setRevoking(token)}>
                        Revoke…
                      </button>
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
          <CreateTokenForm
            onCreated={(result) => {
              setCreated(result);
              upsert(result.token);
            }}
          />
        </section>
      )}
      <ConfirmDialog
        open={revoking !== null}
        title={`Revoke token ${revoking?.name ?? ""}?`}
        confirmLabel="Revoke token"
        testId="revoke-token-dialog"
        onClose={() => setRevoking(null)}
        onConfirm={async () => {
          if (revoking) upsert(await revokeToken(revoking.id));
        }}
      >
        <p>Every request made with it from now on is refused (401). A revoked token cannot be brought back.</p>
      </ConfirmDialog>
    </div>
  );
}
