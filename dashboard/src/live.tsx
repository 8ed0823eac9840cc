// One shared SSE connection per signed-in session, fanned out to the pages that listen.
import { createContext, useContext, useEffect, useMemo, useRef, useState, type ReactNode } from "react";
import {
  ApiError,
  isAbortError,
  isCommandPublic,
  isDevicePublic,
  isLogRecordPublic,
  streamEvents,
  type CommandPublic,
  type DevicePublic,
  type LogRecordPublic,
} from "./api";
import { isDeploymentPublic, isResultPublic, type DeploymentPublic, type ResultPublic } from "./modelsApi";

export type LiveState = "connecting" | "live" | "reconnecting";

/** The `event:` names the stream carries and the payload of each. */
export interface LiveEvents {
  device: DevicePublic;
  command: CommandPublic;
  log: LogRecordPublic;
  result: ResultPublic;
  deployment: DeploymentPublic;
}

export type LiveEventName = keyof LiveEvents;

export type LiveListener<K extends LiveEventName> = (payload: LiveEvents[K]) => void;

type ListenerSets = { [K in LiveEventName]: Set<LiveListener<K>> };

const GUARDS: { [K in LiveEventName]: (value: unknown) => value is LiveEvents[K] } = {
  device: isDevicePublic,
  command: isCommandPublic,
  log: isLogRecordPublic,
  result: isResultPublic,
  deployment: isDeploymentPublic,
};

function isLiveEventName(name: string): name is LiveEventName {
  return Object.hasOwn(GUARDS, name);
}

interface LiveContextValue {
  state: LiveState;
  /** Increments every time the stream (re)opens; pages re-fetch on change to cover missed events. */
  epoch: number;
  subscribe: <K extends LiveEventName>(event: K, listener: LiveListener<K>) => () => void;
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

function dispatch<K extends LiveEventName>(sets: ListenerSets, event: K, payload: unknown): void {
  const guard: (value: unknown) => value is LiveEvents[K] = GUARDS[event];
  if (!guard(payload)) return;
  const set: Set<LiveListener<K>> = sets[event];
  for (const listener of set) listener(payload);
}

export function LiveProvider({ children }: { children: ReactNode }) {
  const [state, setState] = useState<LiveState>("connecting");
  const [epoch, setEpoch] = useState(0);
  const listeners = useRef<ListenerSets>({
    device: new Set(),
    command: new Set(),
    log: new Set(),
    result: new Set(),
    deployment: new Set(),
  });

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
              if (!isLiveEventName(message.event)) return;
              let payload: unknown;
              try {
                payload = JSON.parse(message.data);
              } catch {
                return;
              }
              dispatch(listeners.current, message.event, payload);
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
      subscribe: <K extends LiveEventName>(event: K, listener: LiveListener<K>) => {
        const set: Set<LiveListener<K>> = listeners.current[event];
        set.add(listener);
        return () => {
          set.delete(listener);
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

/** Calls `onEvent` for every live event named `event`; the latest callback is always used. */
export function useLiveEvent<K extends LiveEventName>(event: K, onEvent: LiveListener<K>): void {
  const { subscribe } = useLive();
  const latest = useRef(onEvent);
  useEffect(() => {
    latest.current = onEvent;
  });
  useEffect(() => subscribe(event, (payload) => latest.current(payload)), [subscribe, event]);
}

/** Calls `onDevice` for every live `device` event. */
export function useDeviceEvents(onDevice: LiveListener<"device">): void {
  useLiveEvent("device", onDevice);
}

/** Calls `onCommand` for every command status change. */
export function useCommandEvents(onCommand: LiveListener<"command">): void {
  useLiveEvent("command", onCommand);
}

/** Calls `onLog` for every stored log record of any device. */
export function useLogEvents(onLog: LiveListener<"log">): void {
  useLiveEvent("log", onLog);
}

/** Calls `onResult` for every stored inference result of any device. */
export function useResultEvents(onResult: LiveListener<"result">): void {
  useLiveEvent("result", onResult);
}

/** Calls `onDeployment` for every deployment change. */
export function useDeploymentEvents(onDeployment: LiveListener<"deployment">): void {
  useLiveEvent("deployment", onDeployment);
}
