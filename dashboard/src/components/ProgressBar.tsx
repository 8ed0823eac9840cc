import { bytes } from "../format";
import { progressPercent } from "../models";

interface ProgressBarProps {
  done: number | null | undefined;
  total: number | null | undefined;
  label: string;
  testId?: string;
}

/** A byte-count progress bar: "3.1 MB of 12.0 MB (26%)". */
export function ProgressBar({ done, total, label, testId }: ProgressBarProps) {
  const pct = progressPercent(done, total);
  return (
    <div className="progress" data-testid={testId} data-percent={pct === null ? undefined : Math.floor(pct)}>
      <div
        className="progress-track"
        role="progressbar"
        aria-label={label}
        aria-valuemin={0}
        aria-valuemax={100}
        aria-valuenow={pct === null ? undefined : Math.round(pct)}
      >
        <div className="progress-fill" style={{ width: `${pct ?? 0}%` }} />
      </div>
      <span className="progress-text small muted">
        {pct === null ? bytes(done ?? 0) : `${bytes(done)} of ${bytes(total)} (${Math.floor(pct)}%)`}
      </span>
    </div>
  );
}
