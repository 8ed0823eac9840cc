// Operator session: a short-lived access token and the refresh token that renews it, both in
// sessionStorage (per tab, gone when the tab closes). The access token is renewed shortly before
// it expires; a refresh token is good for one renewal and the server revokes the whole session
// if a spent one comes back, so renewals here never run two at a time.
import { useSyncExternalStore } from "react";

const STORAGE_KEY = "edgefleet.session";
const REFRESH_URL = "/api/v1/auth/refresh";
const LOGOUT_URL = "/api/v1/auth/logout";
/** Renew this long before the access token expires (or at half its life if that is shorter). */
const RENEW_AHEAD_MS = 60_000;

interface StoredSession {
  token: string;
  /** Epoch milliseconds after which the token is no longer valid, or null if unknown. */
  expiresAt: number | null;
  /** One-use token that buys a new access token, or null when the server gave none. */
  refreshToken: string | null;
  /** Epoch milliseconds after which the refresh token (the whole session) is over. */
  refreshExpiresAt: number | null;
}

/** What the server answers to a login or a refresh. */
export interface SessionTokens {
  access_token: string;
  expires_in: number;
  refresh_token?: string;
  refresh_expires_in?: number;
}

/** Why the session ended, shown once on the login page. */
export type SignOutReason = "expired" | "signed-out";

type Listener = () => void;

const listeners = new Set<Listener>();
let current: StoredSession | null = readStored();
let lastReason: SignOutReason | null = null;
let expiryTimer: ReturnType<typeof setTimeout> | undefined;
let refreshing: Promise<boolean> | null = null;

scheduleExpiry();

function deadline(seconds: number | null | undefined): number | null {
  return seconds != null && Number.isFinite(seconds) && seconds > 0 ? Date.now() + seconds * 1000 : null;
}

function numberOrNull(value: unknown): number | null {
  return typeof value === "number" ? value : null;
}

function readStored(): StoredSession | null {
  try {
    const raw = window.sessionStorage.getItem(STORAGE_KEY);
    if (!raw) return null;
    const parsed: unknown = JSON.parse(raw);
    if (
      typeof parsed === "object" &&
      parsed !== null &&
      "token" in parsed &&
      typeof parsed.token === "string" &&
      parsed.token !== ""
    ) {
      const expiresAt = "expiresAt" in parsed ? numberOrNull(parsed.expiresAt) : null;
      const refreshToken =
        "refreshToken" in parsed && typeof parsed.refreshToken === "string" && parsed.refreshToken !== ""
          ? parsed.refreshToken
          : null;
      const refreshExpiresAt = "refreshExpiresAt" in parsed ? numberOrNull(parsed.refreshExpiresAt) : null;
      const now = Date.now();
      const accessOver = expiresAt !== null && expiresAt <= now;
      const refreshOver = refreshToken === null || (refreshExpiresAt !== null && refreshExpiresAt <= now);
      if (accessOver && refreshOver) {
        window.sessionStorage.removeItem(STORAGE_KEY);
        return null;
      }
      return { token: parsed.token, expiresAt, refreshToken, refreshExpiresAt };
    }
  } catch {
    // Storage unavailable or corrupt: start signed out.
  }
  return null;
}

function writeStored(session: StoredSession | null): void {
  try {
    if (session) window.sessionStorage.setItem(STORAGE_KEY, JSON.stringify(session));
    else window.sessionStorage.removeItem(STORAGE_KEY);
  } catch {
    // Keep the in-memory session even if storage is unavailable.
  }
}

function scheduleExpiry(): void {
  if (expiryTimer !== undefined) clearTimeout(expiryTimer);
  expiryTimer = undefined;
  if (current?.expiresAt == null) return;
  const left = current.expiresAt - Date.now();
  if (current.refreshToken !== null) {
    // Renew ahead of expiry; the request that would have failed never sees a 401.
    const ahead = Math.min(RENEW_AHEAD_MS, Math.max(left / 2, 0));
    const delay = Math.min(Math.max(left - ahead, 0), 2 ** 31 - 1);
    expiryTimer = setTimeout(() => void refreshSession(), delay);
    return;
  }
  // setTimeout overflows past ~24.8 days; such tokens are re-checked on the next call anyway.
  expiryTimer = setTimeout(() => clearToken("expired"), Math.max(Math.min(left, 2 ** 31 - 1), 0));
}

function emit(): void {
  for (const listener of listeners) listener();
}

function store(session: StoredSession): void {
  current = session;
  lastReason = null;
  writeStored(current);
  scheduleExpiry();
  emit();
}

export function getToken(): string | null {
  return current?.token ?? null;
}

/** Keep a whole login or refresh answer: access token, refresh token and their lifetimes. */
export function setSession(tokens: SessionTokens): void {
  store({
    token: tokens.access_token,
    expiresAt: deadline(tokens.expires_in),
    refreshToken: tokens.refresh_token ?? null,
    refreshExpiresAt: deadline(tokens.refresh_expires_in),
  });
}

/** Keep an access token; the refresh token stored with it (by `setSession`) stays. */
export function setToken(token: string, expiresInSeconds: number | null): void {
  const same = current !== null && current.token === token;
  store({
    token,
    expiresAt: deadline(expiresInSeconds),
    refreshToken: same && current ? current.refreshToken : null,
    refreshExpiresAt: same && current ? current.refreshExpiresAt : null,
  });
}

export function clearToken(reason: SignOutReason): void {
  if (current === null) return;
  const ended = current;
  current = null;
  lastReason = reason;
  writeStored(null);
  scheduleExpiry();
  emit();
  if (reason === "signed-out") {
    // End the session on the server too, so its tokens stop working now, not at expiry.
    void fetch(LOGOUT_URL, {
      method: "POST",
      headers: { Authorization: `Bearer ${ended.token}` },
      cache: "no-store",
      credentials: "same-origin",
      keepalive: true,
    }).catch(() => undefined);
  }
}

/**
 * Swap the refresh token for a new access token. Resolves true when the session goes on, false
 * when it is over (the tab is then signed out). Concurrent callers share one request.
 */
export function refreshSession(): Promise<boolean> {
  if (refreshing !== null) return refreshing;
  const session = current;
  if (session === null || session.refreshToken === null) return Promise.resolve(false);
  refreshing = (async (): Promise<boolean> => {
    let response: Response;
    try {
      response = await fetch(REFRESH_URL, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ refresh_token: session.refreshToken }),
        cache: "no-store",
        credentials: "same-origin",
      });
    } catch {
      // Offline for a moment: keep the session while the access token lasts, try again soon.
      if (current === session && session.expiresAt !== null && session.expiresAt > Date.now()) {
        if (expiryTimer !== undefined) clearTimeout(expiryTimer);
        expiryTimer = setTimeout(() => void refreshSession(), 10_000);
        return true;
      }
      return false;
    }
    if (current !== session) return current !== null; // signed out or in again meanwhile
    if (!response.ok) {
      clearToken("expired");
      return false;
    }
    const body = (await response.json()) as SessionTokens;
    setSession(body);
    return true;
  })().finally(() => {
    refreshing = null;
  });
  return refreshing;
}

/** Why the last session in this tab ended, so the login page can explain it. */
export function signOutReason(): SignOutReason | null {
  return lastReason;
}

function subscribe(listener: Listener): () => void {
  listeners.add(listener);
  return () => {
    listeners.delete(listener);
  };
}

/** The current bearer token (or null), re-rendering when it changes. */
export function useToken(): string | null {
  return useSyncExternalStore(subscribe, getToken, getToken);
}
