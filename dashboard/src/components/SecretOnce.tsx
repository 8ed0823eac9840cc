import { useEffect, useState, type ReactNode } from "react";

/** A copy-to-clipboard button for one secret value; says whether the copy worked. */
export function CopyButton({ value, label = "Copy" }: { value: string; label?: string }) {
  const [copied, setCopied] = useState<"yes" | "no" | null>(null);

  async function copy(): Promise<void> {
    try {
      await navigator.clipboard.writeText(value);
      setCopied("yes");
    } catch {
      // No clipboard permission (or not a secure context): the value stays selectable.
      setCopied("no");
    }
  }

  return (
    <button type="button" className="button button-quiet" onClick={() => void copy()}>
      {copied === "yes" ? "Copied" : copied === "no" ? "Copy failed: select it" : label}
    </button>
  );
}

/** One secret value in a read-only, select-on-focus field with a copy button. */
export function SecretValue({ label, value, testId }: { label: string; value: string; testId: string }) {
  return (
    <div className="secret-value">
      <span className="field-label">{label}</span>
      <div className="secret-row">
        <code className="secret-text" data-testid={testId} tabIndex={0}>
          {value}
        </code>
        <CopyButton value={value} />
      </div>
    </div>
  );
}

/**
 * A secret the server shows only once (a password, a token secret, a key): a clear warning,
 * the value(s), and a button that dismisses it for good.
 */
export function SecretOnce({
  title,
  children,
  onDone,
  testId = "secret-once",
}: {
  title: string;
  children: ReactNode;
  onDone: () => void;
  testId?: string;
}) {
  return (
    <section className="panel secret-once" role="region" aria-label={title} data-testid={testId}>
      <h2>{title}</h2>
      <p className="secret-warning" data-testid="secret-warning">
        Save this now: <strong>you will not see it again.</strong> No page or API shows it a second
        time; if it is lost, create a new one.
      </p>
      {children}
      <div className="form-actions">
        <button type="button" className="button" onClick={onDone}>
          I have saved it
        </button>
      </div>
    </section>
  );
}

/** A link that downloads `text` as the file `filename`, built in the browser (never uploaded). */
export function DownloadLink({
  filename,
  text,
  type = "text/plain",
  children,
}: {
  filename: string;
  text: string;
  type?: string;
  children?: ReactNode;
}) {
  const [url, setUrl] = useState<string | null>(null);
  useEffect(() => {
    const objectUrl = URL.createObjectURL(new Blob([text], { type }));
    setUrl(objectUrl);
    return () => URL.revokeObjectURL(objectUrl);
  }, [text, type]);
  if (url === null) return null;
  return (
    <a className="button button-quiet" href={url} download={filename} data-testid={`download-${filename}`}>
      {children ?? filename}
    </a>
  );
}
