import type { CommandPublic } from "../api";
import { formatScalar, splitResult } from "../commands";
import { EM_DASH } from "../format";

function lineCount(text: string): string {
  const n = text === "" ? 0 : text.split("\n").length;
  return `${n} ${n === 1 ? "line" : "lines"}`;
}

/** The device's detail message and result; long text (collect-logs lines) folds into a <pre>. */
export function CommandResult({ command }: { command: CommandPublic }) {
  const { detail, result } = command;
  const { short, long } = result ? splitResult(command.type, result) : { short: [], long: [] };
  if (!detail && short.length === 0 && long.length === 0) return <span className="muted">{EM_DASH}</span>;
  return (
    <div className="command-result" data-testid="command-result">
      {detail && <div className="command-detail">{detail}</div>}
      {short.length > 0 && (
        <span className="chips">
          {short.map(([key, value]) => (
            <span className="chip" key={key}>
              {key}={formatScalar(value)}
            </span>
          ))}
        </span>
      )}
      {long.map(([key, text]) => (
        <details key={key} data-result-key={key}>
          <summary>
            {key} ({lineCount(text)})
          </summary>
          <pre className="result-pre">{text}</pre>
        </details>
      ))}
    </div>
  );
}
