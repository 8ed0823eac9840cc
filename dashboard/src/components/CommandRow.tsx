import type { CommandPublic } from "../api";
import { formatScalar } from "../commands";
import { absoluteTime, relativeTime } from "../format";
import { CommandResult } from "./CommandResult";
import { CommandStatusBadge } from "./CommandStatusBadge";

/** Longer parameter values (an infer command's input tensor) are cut to this many characters. */
const PARAM_SHOWN_CHARS = 120;

function shorten(text: string): string {
  return text.length <= PARAM_SHOWN_CHARS ? text : `${text.slice(0, PARAM_SHOWN_CHARS)}… (${text.length} chars)`;
}

export function CommandRow({ command, now }: { command: CommandPublic; now: number }) {
  const params = Object.entries(command.params);
  return (
    <tr data-command-id={command.id} data-command-type={command.type} data-status={command.status}>
      <td data-label="Command">
        <div className="mono command-type">{command.type}</div>
        {params.length > 0 && (
          <div className="command-params muted small">
            {params.map(([k, v]) => `${k}=${shorten(formatScalar(v))}`).join(" ")}
          </div>
        )}
      </td>
      <td data-label="Status">
        <CommandStatusBadge status={command.status} />
      </td>
      <td data-label="Issued" className="nowrap" title={`${absoluteTime(command.issued_at)} by ${command.issued_by}`}>
        <time dateTime={command.issued_at}>{relativeTime(command.issued_at, now)}</time>
      </td>
      <td data-label="Updated" className="nowrap" title={absoluteTime(command.updated_at)}>
        <time dateTime={command.updated_at}>{relativeTime(command.updated_at, now)}</time>
      </td>
      <td data-label="Detail">
        <CommandResult command={command} />
      </td>
    </tr>
  );
}
