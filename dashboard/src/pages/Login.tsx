import { useState, type FormEvent } from "react";
import { Navigate, useLocation } from "react-router-dom";
import { errorMessage, login } from "../api";
import { setToken, signOutReason, useToken } from "../auth";
import type { LoginRedirectState } from "../components/RequireAuth";

function redirectTarget(state: unknown): string {
  if (typeof state === "object" && state !== null && "from" in state) {
    const { from } = state as LoginRedirectState;
    // Only same-origin paths: never bounce to another site after sign-in.
    if (typeof from === "string" && from.startsWith("/") && !from.startsWith("//") && from !== "/login") {
      return from;
    }
  }
  return "/";
}

export function Login() {
  const token = useToken();
  const location = useLocation();
  const [username, setUsername] = useState("");
  const [password, setPassword] = useState("");
  const [submitting, setSubmitting] = useState(false);
  const [error, setError] = useState<string | null>(null);

  if (token !== null) return <Navigate to={redirectTarget(location.state)} replace />;

  const reason = signOutReason();
  const notice =
    reason === "expired"
      ? "Your session has expired."
      : reason === "signed-out"
        ? "You have signed out."
        : null;

  async function onSubmit(event: FormEvent<HTMLFormElement>): Promise<void> {
    event.preventDefault();
    if (submitting) return;
    setSubmitting(true);
    setError(null);
    try {
      const result = await login(username.trim(), password);
      setToken(result.access_token, result.expires_in);
      // The re-render redirects (see the <Navigate> above).
    } catch (err) {
      setError(errorMessage(err));
      setSubmitting(false);
    }
  }

  return (
    <div className="login-screen">
      <title>edgefleet</title>
      <div className="login-card">
        <div className="login-brand">edgefleet</div>
        <h1 className="login-title">Operator console</h1>
        {notice && !error && <p className="login-notice">{notice}</p>}
        <form className="form" onSubmit={(e) => void onSubmit(e)} noValidate={false}>
          <label className="field">
            <span className="field-label">Username</span>
            <input
              name="username"
              type="text"
              autoComplete="username"
              autoCapitalize="none"
              spellCheck={false}
              autoFocus
              required
              value={username}
              onChange={(e) => setUsername(e.target.value)}
            />
          </label>
          <label className="field">
            <span className="field-label">Password</span>
            <input
              name="password"
              type="password"
              autoComplete="current-password"
              required
              value={password}
              onChange={(e) => setPassword(e.target.value)}
            />
          </label>
          <div className="form-error" role="alert" data-testid="login-error" aria-live="assertive">
            {error}
          </div>
          <button type="submit" className="button button-primary button-block" disabled={submitting}>
            {submitting ? "Signing in…" : "Sign in"}
          </button>
        </form>
      </div>
    </div>
  );
}
