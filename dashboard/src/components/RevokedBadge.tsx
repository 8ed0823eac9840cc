import { absoluteTime } from "../format";

/** Marks a revoked identity (device, token, integration); the title says when. */
export function RevokedBadge({ at, label = "revoked" }: { at: string; label?: string }) {
  return (
    <span className="badge tone-bad" data-testid="revoked-badge" title={`Revoked ${absoluteTime(at)}`}>
      {label}
    </span>
  );
}
