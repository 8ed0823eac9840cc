import type { DeploymentState, ModelPhase, TargetState } from "../modelsApi";

const GOOD = new Set(["running", "completed"]);
const BAD = new Set(["failed", "refused", "halted", "incompatible"]);
const IDLE = new Set(["waiting", "paused", "rolled_back", "pending"]);

function tone(value: string): string {
  if (GOOD.has(value)) return "tone-good";
  if (BAD.has(value)) return "tone-bad";
  if (IDLE.has(value)) return "tone-idle";
  return "tone-busy";
}

/** A deployment's state; the text is exactly the state value. */
export function DeploymentStateBadge({ state }: { state: DeploymentState }) {
  return (
    <span className={`badge ${tone(state)}`} data-testid="deployment-state" data-state={state}>
      {state}
    </span>
  );
}

/** A deployment target's state; the text is exactly the state value. */
export function TargetStateBadge({ state }: { state: TargetState }) {
  return (
    <span className={`badge ${tone(state)}`} data-testid="target-state" data-state={state}>
      {state}
    </span>
  );
}

/** Where a device is with a model; the text is exactly the phase value. */
export function PhaseBadge({ phase }: { phase: ModelPhase }) {
  return (
    <span className={`badge ${tone(phase)}`} data-testid="model-phase" data-phase={phase}>
      {phase}
    </span>
  );
}
