import type { CommandStatus } from "../api";

/** A command's lifecycle status; the text is exactly the status value. */
export function CommandStatusBadge({ status }: { status: CommandStatus }) {
  return (
    <span className={`badge command-status command-${status}`} data-testid="command-status" data-status={status}>
      {status}
    </span>
  );
}
