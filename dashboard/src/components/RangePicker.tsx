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

export const DEFAULT_RANGE = "1h";

export function findRange(key: string | null): TimeRange {
  return RANGES.find((r) => r.key === key) ?? RANGES.find((r) => r.key === DEFAULT_RANGE) ?? RANGES[0]!;
}

export function RangePicker({ value, onChange }: { value: string; onChange: (key: string) => void }) {
  return (
    <div className="segmented" role="group" aria-label="Time range" data-testid="range-picker">
      {RANGES.map((range) => (
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
