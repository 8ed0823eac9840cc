import { useEffect, useState, type FormEvent } from "react";
import { errorMessage, isAbortError } from "../api";
import { PageError, useAccess } from "../access";
import { createUser, listUsers, ROLES, updateUser, type Role, type UserCreated, type UserPublic } from "../accessApi";
import { ConfirmDialog } from "../components/ConfirmDialog";
import { SecretOnce, SecretValue } from "../components/SecretOnce";
import { absoluteTime, relativeTime } from "../format";
import { useNow } from "../hooks/useNow";

const USERNAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$/;

function CreateUserForm({ onCreated }: { onCreated: (created: UserCreated) => void }) {
  const [username, setUsername] = useState("");
  const [role, setRole] = useState<Role>("viewer");
  const [password, setPassword] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);

  async function submit(event: FormEvent<HTMLFormElement>): Promise<void> {
    event.preventDefault();
    const name = username.trim();
    if (!USERNAME_PATTERN.test(name)) {
      setError("A username is 1-64 letters, digits, '_', '.', '@' or '-', starting with a letter or digit.");
      return;
    }
    setBusy(true);
    setError(null);
    try {
      onCreated(await createUser({ username: name, role, ...(password ? { password } : {}) }));
      setUsername("");
      setPassword("");
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  }

  return (
    <form className="form" data-testid="user-form" onSubmit={(e) => void submit(e)}>
      <h2>Add a user</h2>
      <fieldset className="field-row" disabled={busy}>
        <label className="field">
          <span className="field-label">Username</span>
          <input name="username" type="text" autoComplete="off" required value={username} onChange={(e) => setUsername(e.target.value)} />
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
          <span className="field-label">Password (blank: generate one)</span>
          <input
            name="password"
            type="password"
            autoComplete="new-password"
            value={password}
            onChange={(e) => setPassword(e.target.value)}
          />
        </label>
      </fieldset>
      <p className="hint">
        Viewers read everything; operators also send commands, change desired state, upload and deploy
        models; admins also manage users, tokens, integrations, webhooks and signing keys.
      </p>
      <div className="form-actions">
        <button type="submit" className="button button-primary" disabled={busy}>
          {busy ? "Adding…" : "Add user"}
        </button>
        {error && (
          <span className="form-error" role="alert" data-testid="user-error">
            {error}
          </span>
        )}
      </div>
    </form>
  );
}

function UserRow({
  user,
  self,
  now,
  onChanged,
  onDisable,
}: {
  user: UserPublic;
  self: boolean;
  now: number;
  onChanged: (user: UserPublic) => void;
  onDisable: (user: UserPublic) => void;
}) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);

  async function change(body: { role?: Role; disabled?: boolean }): Promise<void> {
    setBusy(true);
    setError(null);
    try {
      onChanged(await updateUser(user.username, body));
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  }

  return (
    <tr data-username={user.username} data-disabled={user.disabled}>
      <td className="mono">
        {user.username}
        {self && <span className="muted small"> (you)</span>}
      </td>
      <td>
        <select
          aria-label={`Role of ${user.username}`}
          name="user-role"
          value={user.role}
          disabled={busy || self}
          title={self ? "You cannot change your own role" : undefined}
          onChange={(e) => void change({ role: e.target.value as Role })}
        >
          {ROLES.map((r) => (
            <option key={r} value={r}>
              {r}
            </option>
          ))}
        </select>
      </td>
      <td data-testid="user-state">
        {user.disabled ? <span className="badge tone-bad">disabled</span> : <span className="badge tone-good">active</span>}
      </td>
      <td className="nowrap" title={absoluteTime(user.last_login_at)}>
        {user.last_login_at ? relativeTime(user.last_login_at, now) : "never"}
      </td>
      <td className="nowrap muted">{absoluteTime(user.created_at)}</td>
      <td className="nowrap">
        {!self &&
          (user.disabled ? (
            <button type="button" className="button button-quiet" disabled={busy} onClick={() => void change({ disabled: false })}>
              Enable
            </button>
          ) : (
            <button type="button" className="button button-danger" disabled={busy} onClick={() => onDisable(user)}>
              Disable…
            </button>
          ))}
        {error && (
          <span className="form-error" role="alert">
            {" "}
            {error}
          </span>
        )}
      </td>
    </tr>
  );
}

/** Operator accounts [admin]: list, add (a generated password is shown once), change role, disable. */
export function Users() {
  const { isAdmin, me } = useAccess();
  const now = useNow(30_000);
  const [users, setUsers] = useState<UserPublic[] | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [created, setCreated] = useState<UserCreated | null>(null);
  const [disabling, setDisabling] = useState<UserPublic | null>(null);

  useEffect(() => {
    const controller = new AbortController();
    listUsers(controller.signal)
      .then((list) => {
        setUsers(list);
        setError(null);
      })
      .catch((err: unknown) => {
        if (!isAbortError(err)) setError(err);
      });
    return () => controller.abort();
  }, []);

  function upsert(user: UserPublic): void {
    setUsers((current) => {
      const rest = (current ?? []).filter((u) => u.username !== user.username);
      return [...rest, user].sort((a, b) => a.username.localeCompare(b.username));
    });
  }

  return (
    <div className="users-page">
      <title>Users · edgefleet</title>
      <div className="page-header">
        <div>
          <h1>Users</h1>
          <p className="page-subtitle">People who sign in to this dashboard and the REST API.</p>
        </div>
      </div>
      <PageError error={error} />
      {created && (
        <SecretOnce title={`Password of ${created.user.username}`} onDone={() => setCreated(null)}>
          <p>
            {created.user.username} was added as {created.user.role}. Give them this password over a
            safe channel.
          </p>
          <SecretValue label="Password" value={created.password} testId="created-password" />
        </SecretOnce>
      )}
      {users === null && error === null && <p className="muted loading">Loading users…</p>}
      {users !== null && (
        <div className="table-wrap">
          <table className="table" data-testid="users-table">
            <thead>
              <tr>
                <th scope="col">Username</th>
                <th scope="col">Role</th>
                <th scope="col">State</th>
                <th scope="col">Last sign-in</th>
                <th scope="col">Created</th>
                <th scope="col">
                  <span className="visually-hidden">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {users.map((user) => (
                <UserRow
                  key={user.username}
                  user={user}
                  self={me?.kind === "user" && me.name === user.username}
                  now={now}
                  onChanged={upsert}
                  onDisable={setDisabling}
                />
              ))}
            </tbody>
          </table>
        </div>
      )}
      {isAdmin && (
        <section className="panel">
          <CreateUserForm
            onCreated={(result) => {
              setCreated(result);
              upsert(result.user);
            }}
          />
        </section>
      )}
      <ConfirmDialog
        open={disabling !== null}
        title={`Disable ${disabling?.username ?? ""}?`}
        confirmLabel="Disable user"
        testId="disable-user-dialog"
        onClose={() => setDisabling(null)}
        onConfirm={async () => {
          if (disabling) upsert(await updateUser(disabling.username, { disabled: true }));
        }}
      >
        <p>
          They are signed out everywhere at once and cannot sign in until an admin enables them again.
          Their past actions stay in the audit log.
        </p>
      </ConfirmDialog>
    </div>
  );
}
