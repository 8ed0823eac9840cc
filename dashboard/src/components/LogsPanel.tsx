import { useEffect, useLayoutEffect, useMemo, useRef, useState } from "react";
import { errorMessage, getLogs, isAbortError, LOG_LEVELS, type LogLevel, type LogRecordPublic } from "../api";
import { useDebounced } from "../hooks/useDebounced";
import { useLive, useLogEvents } from "../live";
import { appendLogs, isLogLevel, logTime, matchesLog, MAX_LOG_LINES, type LogFilter } from "../logs";
import { Alert } from "./Alert";

/** Pixels from the bottom that still count as "at the bottom" (following the tail). */
const FOLLOW_SLACK_PX = 16;

function LogLine({ record }: { record: LogRecordPublic }) {
  return (
    <div className={`log-line log-${record.level.toLowerCase()}`} data-testid="log-line" data-level={record.level}>
      <time className="log-time" dateTime={record.timestamp} title={record.timestamp}>
        {logTime(record.timestamp)}
      </time>
      <span className="log-level">{record.level}</span>
      <span className="log-logger">{record.logger}</span>
      <span className="log-message">{record.message}</span>
    </div>
  );
}

function LogFilters({ filter, onChange }: { filter: LogFilter; onChange: (filter: LogFilter) => void }) {
  return (
    <div className="section-tools log-filters">
      <label className="inline-field">
        <span className="muted small">Level</span>
        <select
          name="log-level"
          value={filter.level}
          onChange={(e) => {
            const level = e.target.value;
            if (isLogLevel(level)) onChange({ ...filter, level });
          }}
        >
          {LOG_LEVELS.map((level) => (
            <option key={level} value={level}>
              {level === "DEBUG" ? "all (DEBUG+)" : `${level}+`}
            </option>
          ))}
        </select>
      </label>
      <input
        type="search"
        name="log-filter"
        className="log-search"
        placeholder="Filter text"
        aria-label="Filter log lines"
        value={filter.text}
        onChange={(e) => onChange({ ...filter, text: e.target.value })}
      />
    </div>
  );
}

/** Live tail of one device's forwarded log records: an initial fetch plus `log` events. */
export function LogsPanel({ deviceId }: { deviceId: string }) {
  const { epoch } = useLive();
  const [filter, setFilter] = useState<LogFilter>({ level: "DEBUG", text: "" });
  const serverText = useDebounced(filter.text.trim(), 300);
  const level: LogLevel = filter.level;
  const [records, setRecords] = useState<LogRecordPublic[]>([]);
  const [loaded, setLoaded] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const pending = useRef<LogRecordPublic[] | null>(null);

  useEffect(() => {
    const controller = new AbortController();
    pending.current = [];
    getLogs(deviceId, { level, q: serverText, limit: MAX_LOG_LINES }, controller.signal)
      .then((fetched) => {
        if (controller.signal.aborted) return;
        setRecords(appendLogs(fetched, pending.current ?? []));
        pending.current = null;
        setLoaded(true);
        setError(null);
      })
      .catch((err: unknown) => {
        if (isAbortError(err)) return;
        pending.current = null;
        setError(errorMessage(err));
      });
    return () => controller.abort();
  }, [deviceId, level, serverText, epoch]);

  useLogEvents((record) => {
    if (record.device_id !== deviceId || !matchesLog(record, { level, text: serverText })) return;
    pending.current?.push(record);
    setRecords((current) => appendLogs(current, [record]));
  });

  // The text filter applies at once on screen; the server query follows after a pause in typing.
  const visible = useMemo(() => records.filter((r) => matchesLog(r, filter)), [records, filter]);

  const tail = useRef<HTMLDivElement>(null);
  const following = useRef(true);
  const [paused, setPaused] = useState(false);

  function onScroll(): void {
    const el = tail.current;
    if (!el) return;
    const atBottom = el.scrollHeight - el.scrollTop - el.clientHeight <= FOLLOW_SLACK_PX;
    following.current = atBottom;
    setPaused(!atBottom);
  }

  function jumpToLatest(): void {
    const el = tail.current;
    following.current = true;
    setPaused(false);
    if (el) el.scrollTop = el.scrollHeight;
  }

  useLayoutEffect(() => {
    const el = tail.current;
    if (!el) return;
    if (el.scrollHeight <= el.clientHeight) {
      // Nothing to scroll (e.g. a filter left few lines): nothing can be paused either.
      following.current = true;
      setPaused(false);
    } else if (following.current) {
      el.scrollTop = el.scrollHeight;
    }
  }, [visible]);

  return (
    <section className="panel logs-panel" aria-labelledby="logs-heading" data-testid="logs-panel">
      <div className="section-header">
        <h2 id="logs-heading">Logs</h2>
        <LogFilters filter={filter} onChange={setFilter} />
      </div>
      {error && <Alert>{error}</Alert>}
      <div className="log-tail-wrap">
        <div
          ref={tail}
          className="log-tail"
          data-testid="log-tail"
          data-following={paused ? "false" : "true"}
          onScroll={onScroll}
          role="log"
          aria-live="off"
          tabIndex={0}
        >
          {visible.map((record) => (
            <LogLine key={record.message_id} record={record} />
          ))}
          {loaded && visible.length === 0 && (
            <div className="log-empty muted">No log records match. The agent forwards records at or above its forward level.</div>
          )}
          {!loaded && !error && <div className="log-empty muted">Loading logs…</div>}
        </div>
        {paused && (
          <button type="button" className="button button-quiet log-jump" onClick={jumpToLatest}>
            Paused · jump to latest ↓
          </button>
        )}
      </div>
      <p className="muted small log-count">
        {visible.length} {visible.length === 1 ? "line" : "lines"}
        {records.length >= MAX_LOG_LINES ? ` (the latest ${MAX_LOG_LINES} are kept)` : ""}
      </p>
    </section>
  );
}
