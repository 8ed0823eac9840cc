import { EM_DASH } from "../format";

export function TagChips({ tags }: { tags: Record<string, string> }) {
  const entries = Object.entries(tags).sort(([a], [b]) => a.localeCompare(b));
  if (entries.length === 0) return <span className="muted">{EM_DASH}</span>;
  return (
    <span className="chips">
      {entries.map(([key, value]) => (
        <span className="chip" key={key} data-tag={key}>
          {key}={value}
        </span>
      ))}
    </span>
  );
}
