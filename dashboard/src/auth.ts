// Operator session: the bearer token lives in sessionStorage (per tab, gone when the tab closes).
import { useSyncExternalStore } from "react";

const STORAGE_KEY = "edgefleet.session";

interface StoredSession {
  token: string;
  /** Epoch milliseconds after which the token is no longer valid, or null if unknown. */
  expiresAt: number | null;
}

/** Why the session ended, shown once on the login page. */
export type SignOutReason = "expired" | "signed-out";

type Listener = () => void;

const listeners = new Set<Listener>();
let current: StoredSession | null = readStored();
let lastReason: SignOutReason | null = null;
let expiryTimer: ReturnType<typeof setTimeout> | undefined;

scheduleExpiry();

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
      const expiresAt =
        "expiresAt" in parsed && typeof parsed.expiresAt === "number" ? parsed.expiresAt : null;
      if (expiresAt !== null && expiresAt <= Date.now()) {
        window.sessionStorage.removeItem(STORAGE_KEY);
        return null;
      }
      return { token: parsed.token, expiresAt };
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
  // setTimeout overflows past ~24.8 days; such tokens are re-checked on the next call anyway.
  const delay = Math.min(current.expiresAt - Date.now(), 2 ** 31 - 1);
  expiryTimer = setTimeout(() => clearToken("expired"), Math.max(delay, 0));
}

function emit(): void {
  for (const listener of listeners) listener();
}

export function getToken(): string | null {
  return current?.token ?? null;
}

export function setToken(token: string, expiresInSeconds: number | null): void {
  const expiresAt =
    expiresInSeconds != null && Number.isFinite(expiresInSeconds) && expiresInSeconds > 0
      ? Date.now() + expiresInSeconds * 1000
      : null;
  current = { token, expiresAt };
  lastReason = null;
  writeStored(current);
  scheduleExpiry();
  emit();
}

export function clearToken(reason: SignOutReason): void {
  if (current === null) return;
  current = null;
  lastReason = reason;
  writeStored(null);
  scheduleExpiry();
  emit();
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
