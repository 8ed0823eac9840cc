export interface TimeRange {
  key: string;
  label: string;
  seconds: number;
}

export const RANGES: readonly TimeRange[] = [
  { key: "15m", label: "15 min", seconds: 15 * 60 },
  { key: "1h", label: "1 h", seconds: 60 * 60 },
  { key: "6h", label: "6 h", seconds: 6 * 60 * 60 },
  { key: "24h", label: "24 h", seconds: 24 * 60 * 60 },
];

/** Device telemetry goes further back: past two days the service answers with hourly rollups
 * (min/mean/max per hour), which outlive the raw samples. */
export const LONG_RANGES: readonly TimeRange[] = [
  ...RANGES,
  { key: "7d", label: "7 d", seconds: 7 * 24 * 60 * 60 },
  { key: "30d", label: "30 d", seconds: 30 * 24 * 60 * 60 },
];

export const DEFAULT_RANGE = "1h";

export function findRange(key: string | null, ranges: readonly TimeRange[] = RANGES): TimeRange {
  return ranges.find((r) => r.key === key) ?? ranges.find((r) => r.key === DEFAULT_RANGE) ?? ranges[0]!;
}

export function RangePicker({
  value,
  onChange,
  ranges = RANGES,
}: {
  value: string;
  onChange: (key: string) => void;
  ranges?: readonly TimeRange[];
}) {
  return (
    <div className="segmented" role="group" aria-label="Time range" data-testid="range-picker">
      {ranges.map((range) => (
        <button
          key={range.key}
          type="button"
          className={range.key === value ? "segment active" : "segment"}
          aria-pressed={range.key === value}
          data-range={range.key}
          onClick={() => onChange(range.key)}
        >
          {range.label}
        </button>
      ))}
    </div>
  );
}
