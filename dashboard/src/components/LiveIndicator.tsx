import { useLive } from "../live";

const LABELS = { connecting: "connecting", live: "live", reconnecting: "reconnecting" } as const;
const TITLES = {
  connecting: "Connecting to the live event stream…",
  live: "Receiving live updates",
  reconnecting: "The live event stream dropped; reconnecting…",
} as const;

export function LiveIndicator() {
  const { state } = useLive();
  return (
    <span
      className={`live-indicator live-${state}`}
      data-testid="live-indicator"
      data-state={state}
      title={TITLES[state]}
      role="status"
      aria-live="polite"
    >
      <span className="live-dot" aria-hidden="true" />
      {LABELS[state]}
    </span>
  );
}
