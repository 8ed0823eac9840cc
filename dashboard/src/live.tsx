// One shared SSE connection per signed-in session, fanned out to the pages that listen.
import { createContext, useContext, useEffect, useMemo, useRef, useState, type ReactNode } from "react";
import { ApiError, isAbortError, isDevicePublic, streamEvents, type DevicePublic } from "./api";

export type LiveState = "connecting" | "live" | "reconnecting";

type DeviceListener = (device: DevicePublic) => void;

interface LiveContextValue {
  state: LiveState;
  /** Increments every time the stream (re)opens; pages re-fetch on change to cover missed events. */
  epoch: number;
  subscribe: (listener: DeviceListener) => () => void;
}

const LiveContext = createContext<LiveContextValue | null>(null);

const BASE_DELAY_MS = 1_000;
const MAX_DELAY_MS = 30_000;

function backoffDelay(attempt: number, serverRetryMs: number | null): number {
  const base = Math.max(serverRetryMs ?? 0, BASE_DELAY_MS);
  const delay = Math.min(base * 2 ** attempt, MAX_DELAY_MS);
  return delay * (0.8 + Math.random() * 0.4); // ±20% jitter so a fleet of tabs does not stampede
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done(): void {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done);
  });
}

export function LiveProvider({ children }: { children: ReactNode }) {
  const [state, setState] = useState<LiveState>("connecting");
  const [epoch, setEpoch] = useState(0);
  const listeners = useRef(new Set<DeviceListener>());

  useEffect(() => {
    const controller = new AbortController();
    const { signal } = controller;

    async function run(): Promise<void> {
      let attempt = 0;
      let serverRetryMs: number | null = null;
      while (!signal.aborted) {
        try {
          const result = await streamEvents({
            signal,
            onOpen: () => {
              attempt = 0;
              setState("live");
              setEpoch((n) => n + 1);
            },
            onMessage: (message) => {
              if (message.event !== "device") return;
              let payload: unknown;
              try {
                payload = JSON.parse(message.data);
              } catch {
                return;
              }
              if (!isDevicePublic(payload)) return;
              for (const listener of listeners.current) listener(payload);
            },
          });
          serverRetryMs = result.retryMs;
        } catch (err) {
          if (signal.aborted || isAbortError(err)) return;
          // A 401 has already ended the session; the app is on its way to /login.
          if (err instanceof ApiError && err.status === 401) return;
        }
        if (signal.aborted) return;
        setState("reconnecting");
        await sleep(backoffDelay(attempt, serverRetryMs), signal);
        attempt += 1;
      }
    }

    void run();
    return () => controller.abort();
  }, []);

  const value = useMemo<LiveContextValue>(
    () => ({
      state,
      epoch,
      subscribe: (listener) => {
        listeners.current.add(listener);
        return () => {
          listeners.current.delete(listener);
        };
      },
    }),
    [state, epoch],
  );

  return <LiveContext.Provider value={value}>{children}</LiveContext.Provider>;
}

export function useLive(): LiveContextValue {
  const value = useContext(LiveContext);
  if (value === null) throw new Error("useLive() must be used inside <LiveProvider>");
  return value;
}

/** Calls `onDevice` for every live `device` event; the latest callback is always used. */
export function useDeviceEvents(onDevice: DeviceListener): void {
  const { subscribe } = useLive();
  const latest = useRef(onDevice);
  useEffect(() => {
    latest.current = onDevice;
  });
  useEffect(() => subscribe((device) => latest.current(device)), [subscribe]);
}
