import { useEffect, useRef, useState, type FormEvent } from "react";
import { IfRole } from "../access";
import { errorMessage, isAbortError, listCommands, sendCommand, type CommandPublic } from "../api";
import { buildParams, emptyDraft, upsertCommand, type CommandDraft } from "../commands";
import { useNow } from "../hooks/useNow";
import { useCommandEvents, useLive } from "../live";
import { Alert } from "./Alert";
import { CommandFields } from "./CommandFields";
import { CommandRow } from "./CommandRow";

/** Commands shown per device. */
const COMMAND_LIMIT = 50;

function SendCommandForm({ deviceId, onSent }: { deviceId: string; onSent: (command: CommandPublic) => void }) {
  const [draft, setDraft] = useState<CommandDraft>(emptyDraft);
  const [sending, setSending] = useState(false);
  const [error, setError] = useState<string | null>(null);

  async function submit(event: FormEvent<HTMLFormElement>): Promise<void> {
    event.preventDefault();
    const built = buildParams(draft.params);
    if (!built.ok) {
      setError(built.error);
      return;
    }
    setSending(true);
    setError(null);
    try {
      onSent(await sendCommand(deviceId, { type: draft.type, params: built.params, expires_in_s: draft.expiresInS }));
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setSending(false);
    }
  }

  return (
    <form className="form command-form" data-testid="command-form" onSubmit={(e) => void submit(e)}>
      <CommandFields draft={draft} onChange={setDraft} idPrefix="device-command" disabled={sending} />
      <div className="form-actions">
        <button type="submit" className="button button-primary" disabled={sending}>
          {sending ? "Sending…" : "Send command"}
        </button>
        {error && (
          <span className="form-error" role="alert" data-testid="command-error">
            {error}
          </span>
        )}
      </div>
    </form>
  );
}

/** Send a command to one device and follow its recent commands live. */
export function CommandsPanel({ deviceId }: { deviceId: string }) {
  const { epoch } = useLive();
  const now = useNow(1000);
  const [commands, setCommands] = useState<CommandPublic[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  // Updates that arrive while the list request is in flight are re-applied on top of its answer.
  const pending = useRef<CommandPublic[] | null>(null);

  useEffect(() => {
    const controller = new AbortController();
    pending.current = [];
    listCommands(deviceId, COMMAND_LIMIT, controller.signal)
      .then((list) => {
        if (controller.signal.aborted) return;
        let next = list.slice(0, COMMAND_LIMIT);
        for (const command of pending.current ?? []) next = upsertCommand(next, command, COMMAND_LIMIT);
        pending.current = null;
        setCommands(next);
        setError(null);
      })
      .catch((err: unknown) => {
        if (isAbortError(err)) return;
        pending.current = null;
        setError(errorMessage(err));
      });
    return () => controller.abort();
  }, [deviceId, epoch]);

  function apply(command: CommandPublic): void {
    if (command.device_id !== deviceId) return;
    pending.current?.push(command);
    setCommands((current) => upsertCommand(current ?? [], command, COMMAND_LIMIT));
  }

  useCommandEvents(apply);

  return (
    <section className="panel commands-panel" aria-labelledby="commands-heading" data-testid="commands-panel">
      <div className="section-header">
        <h2 id="commands-heading">Commands</h2>
      </div>
      <IfRole needed="operator" what="send commands">
        <SendCommandForm deviceId={deviceId} onSent={apply} />
      </IfRole>
      {error && <Alert>{error}</Alert>}
      {commands === null && !error && <p className="muted loading">Loading commands…</p>}
      {commands !== null && commands.length === 0 && (
        <p className="muted" data-testid="commands-empty">
          No commands sent to this device yet.
        </p>
      )}
      {commands !== null && commands.length > 0 && (
        <div className="table-wrap">
          <table className="table commands-table" data-testid="commands-table">
            <thead>
              <tr>
                <th scope="col">Command</th>
                <th scope="col">Status</th>
                <th scope="col">Issued</th>
                <th scope="col">Updated</th>
                <th scope="col">Detail / result</th>
              </tr>
            </thead>
            <tbody>
              {commands.map((command) => (
                <CommandRow key={command.id} command={command} now={now} />
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}
