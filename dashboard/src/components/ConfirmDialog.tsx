import { useEffect, useRef, useState, type FormEvent, type ReactNode } from "react";
import { errorMessage } from "../api";

interface ConfirmDialogProps {
  open: boolean;
  title: string;
  /** What confirming does, in plain words. */
  children: ReactNode;
  confirmLabel: string;
  /** Ask for an optional reason (kept in the audit log). */
  askReason?: boolean;
  /** Runs the action; a thrown error (e.g. a 403 problem) is shown in the dialog. */
  onConfirm: (reason: string | null) => Promise<void>;
  onClose: () => void;
  testId?: string;
}

/** A modal that says what an irreversible action does and runs it only when confirmed. */
export function ConfirmDialog({
  open,
  title,
  children,
  confirmLabel,
  askReason = false,
  onConfirm,
  onClose,
  testId = "confirm-dialog",
}: ConfirmDialogProps) {
  const dialog = useRef<HTMLDialogElement>(null);
  const [reason, setReason] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    const el = dialog.current;
    if (!el) return;
    if (open && !el.open) {
      setError(null);
      setReason("");
      el.showModal();
    }
    if (!open && el.open) el.close();
  }, [open]);

  async function submit(event: FormEvent<HTMLFormElement>): Promise<void> {
    event.preventDefault();
    setBusy(true);
    setError(null);
    try {
      await onConfirm(reason.trim() === "" ? null : reason.trim());
      onClose();
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  }

  return (
    <dialog ref={dialog} className="dialog" data-testid={testId} aria-labelledby={`${testId}-heading`} onClose={onClose}>
      <form className="form" onSubmit={(e) => void submit(e)}>
        <h2 id={`${testId}-heading`}>{title}</h2>
        <div className="confirm-text">{children}</div>
        {askReason && (
          <label className="field">
            <span className="field-label">Reason (optional, kept in the audit log)</span>
            <input
              type="text"
              name="reason"
              maxLength={200}
              autoComplete="off"
              value={reason}
              disabled={busy}
              onChange={(e) => setReason(e.target.value)}
            />
          </label>
        )}
        {error && (
          <p className="form-error" role="alert" data-testid={`${testId}-error`}>
            {error}
          </p>
        )}
        <div className="form-actions">
          <button type="submit" className="button button-danger" disabled={busy}>
            {busy ? `${confirmLabel}…` : confirmLabel}
          </button>
          <button type="button" className="button" onClick={onClose} disabled={busy}>
            Cancel
          </button>
        </div>
      </form>
    </dialog>
  );
}
