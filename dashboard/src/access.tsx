// Who is signed in and what their role lets the dashboard offer. GET /auth/me is read once per
// sign-in (not per token renewal); pages ask `useAccess().can(role)` to hide actions the role
// cannot take. This is only a courtesy: the server checks the role on every request, and a
// refusal (403) shows its problem detail where the action was tried.
import { createContext, useContext, useEffect, useMemo, useState, type ReactNode } from "react";
import { ApiError, errorMessage, getMe, isAbortError, type Me } from "./api";
import { useToken } from "./auth";
import { Alert } from "./components/Alert";

export type Role = Me["role"];

const RANK: Record<Role, number> = { viewer: 0, operator: 1, admin: 2 };
/** After a failed /auth/me (not a 401), ask again this much later. */
const RETRY_MS = 5_000;

/** Whether `have` covers `needed` (viewer < operator < admin). */
export function grants(have: Role, needed: Role): boolean {
  return RANK[have] >= RANK[needed];
}

export interface Access {
  /** The signed-in principal, or null until /auth/me has answered. */
  me: Me | null;
  /** Why /auth/me failed, while it keeps failing. */
  error: string | null;
  /** Whether the principal's role covers `needed` (false while unknown). */
  can: (needed: Role) => boolean;
  /** Fleet-wide admin: the admin role without a tag scope (admin routes refuse tagged tokens). */
  isAdmin: boolean;
}

const AccessContext = createContext<Access>({ me: null, error: null, can: () => false, isAdmin: false });

/** Reads /auth/me whenever a session starts; forgets it when the session ends. */
export function AccessProvider({ children }: { children: ReactNode }) {
  const signedIn = useToken() !== null;
  const [me, setMe] = useState<Me | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [attempt, setAttempt] = useState(0);

  useEffect(() => {
    if (!signedIn) {
      setMe(null);
      setError(null);
      return;
    }
    const controller = new AbortController();
    let retry: ReturnType<typeof setTimeout> | undefined;
    getMe(controller.signal)
      .then((found) => {
        setMe(found);
        setError(null);
      })
      .catch((err: unknown) => {
        if (isAbortError(err)) return;
        // A 401 ends the session (api.ts signs the tab out); anything else is retried.
        if (err instanceof ApiError && err.status === 401) return;
        setError(errorMessage(err));
        retry = setTimeout(() => setAttempt((n) => n + 1), RETRY_MS);
      });
    return () => {
      controller.abort();
      if (retry !== undefined) clearTimeout(retry);
    };
  }, [signedIn, attempt]);

  const value = useMemo<Access>(
    () => ({
      me,
      error,
      can: (needed: Role) => me !== null && grants(me.role, needed),
      isAdmin: me !== null && me.role === "admin" && me.tag === null,
    }),
    [me, error],
  );
  return <AccessContext.Provider value={value}>{children}</AccessContext.Provider>;
}

export function useAccess(): Access {
  return useContext(AccessContext);
}

const ROLE_NOUN: Record<Role, string> = { viewer: "a viewer", operator: "an operator", admin: "an admin" };

/**
 * Shown instead of an action the signed-in role cannot take. `what` completes the sentence
 * "… cannot <what>", e.g. "send commands".
 */
export function ReadOnlyNote({ needed, what }: { needed: Role; what: string }) {
  const { me } = useAccess();
  if (me === null) return null;
  return (
    <p className="muted small read-only-note" data-testid="read-only-note">
      You are signed in as {ROLE_NOUN[me.role]}: only {ROLE_NOUN[needed]} or above can {what}.
    </p>
  );
}

/** Children when the role covers `needed`, else a read-only note (or nothing while unknown). */
export function IfRole({ needed, what, children }: { needed: Role; what?: string; children: ReactNode }) {
  const { can, me } = useAccess();
  if (can(needed)) return <>{children}</>;
  if (me === null || what === undefined) return null;
  return <ReadOnlyNote needed={needed} what={what} />;
}

/**
 * A page's load error: a 403 says plainly that the role does not reach this page, with the
 * server's own explanation; anything else is the message as it is.
 */
export function PageError({ error }: { error: unknown }) {
  if (error === null || error === undefined) return null;
  if (error instanceof ApiError && error.status === 403) {
    return (
      <Alert>
        <strong data-testid="forbidden-title">You do not have access to this page.</strong>{" "}
        <span data-testid="forbidden-detail">{error.detail}</span>
      </Alert>
    );
  }
  return <Alert>{errorMessage(error)}</Alert>;
}
