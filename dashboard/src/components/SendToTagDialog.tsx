import { useEffect, useRef, useState, type FormEvent } from "react";
import { errorMessage, sendCommandToTag, type CommandPublic } from "../api";
import { buildParams, emptyDraft, TAG_PATTERN, type CommandDraft } from "../commands";
import { CommandFields } from "./CommandFields";

interface SendToTagDialogProps {
  open: boolean;
  onClose: () => void;
  /** `key=value` tags seen on the listed devices, offered as suggestions. */
  knownTags: readonly string[];
}

/** A modal form that sends one command to every device carrying a tag. */
export function SendToTagDialog({ open, onClose, knownTags }: SendToTagDialogProps) {
  const dialog = useRef<HTMLDialogElement>(null);
  const [tag, setTag] = useState("");
  const [draft, setDraft] = useState<CommandDraft>(emptyDraft);
  const [sending, setSending] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const [sent, setSent] = useState<CommandPublic[] | null>(null);

  useEffect(() => {
    const el = dialog.current;
    if (!el) return;
    if (open && !el.open) {
      // A fresh outcome each time the dialog opens; the form keeps what was typed.
      setSent(null);
      setError(null);
      el.showModal();
    }
    if (!open && el.open) el.close();
  }, [open]);

  async function submit(event: FormEvent<HTMLFormElement>): Promise<void> {
    event.preventDefault();
    const trimmed = tag.trim();
    if (!TAG_PATTERN.test(trimmed)) {
      setError("Give the tag as key=value, e.g. site=lab.");
      return;
    }
    const built = buildParams(draft.params);
    if (!built.ok) {
      setError(built.error);
      return;
    }
    setSending(true);
    setError(null);
    setSent(null);
    try {
      setSent(
        await sendCommandToTag({ tag: trimmed, type: draft.type, params: built.params, expires_in_s: draft.expiresInS }),
      );
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setSending(false);
    }
  }

  return (
    <dialog
      ref={dialog}
      className="dialog"
      data-testid="tag-command-dialog"
      aria-labelledby="tag-command-heading"
      onClose={onClose}
    >
      <form className="form" onSubmit={(e) => void submit(e)}>
        <h2 id="tag-command-heading">Send a command to a tag</h2>
        <label className="field">
          <span className="field-label">Tag</span>
          <input
            type="text"
            name="tag"
            placeholder="key=value"
            list="known-tags"
            autoComplete="off"
            required
            value={tag}
            disabled={sending}
            onChange={(e) => setTag(e.target.value)}
          />
          <datalist id="known-tags">
            {knownTags.map((t) => (
              <option key={t} value={t} />
            ))}
          </datalist>
        </label>
        <CommandFields draft={draft} onChange={setDraft} idPrefix="tag-command" disabled={sending} />
        {error && (
          <p className="form-error" role="alert" data-testid="tag-command-error">
            {error}
          </p>
        )}
        {sent !== null && (
          <p className="alert alert-info" role="status" data-testid="tag-command-result" data-count={sent.length}>
            {sent.length === 0
              ? "No device carries this tag; nothing was sent."
              : `Sent to ${sent.length} ${sent.length === 1 ? "device" : "devices"}.`}
          </p>
        )}
        <div className="form-actions">
          <button type="submit" className="button button-primary" disabled={sending}>
            {sending ? "Sending…" : "Send command"}
          </button>
          <button type="button" className="button" onClick={onClose}>
            Close
          </button>
        </div>
      </form>
    </dialog>
  );
}
