import { useEffect, useRef, useState } from "react";
import { errorMessage, isAbortError } from "../api";
import { useLive, useResultEvents } from "../live";
import { addResult } from "../models";
import { getResultSummary, listResults, type ResultPublic, type ResultSummary } from "../modelsApi";

/** Results kept in memory per view (the charts and the table both draw from them). */
export const RESULT_LIMIT = 500;
/** The summary is re-read at most this often while results stream in. */
const SUMMARY_REFRESH_MS = 2_000;

export interface ResultsState {
  /** Newest first; null until the first answer. */
  results: ResultPublic[] | null;
  summary: ResultSummary[] | null;
  error: string | null;
}

/** Recent results and the per-version summary for a model and/or device, kept live over SSE. */
export function useResults(filter: { model?: string | undefined; deviceId?: string | undefined }): ResultsState {
  const { model, deviceId } = filter;
  const { epoch } = useLive();
  const [results, setResults] = useState<ResultPublic[] | null>(null);
  const [summary, setSummary] = useState<ResultSummary[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [summaryTick, setSummaryTick] = useState(0);
  const pending = useRef<ResultPublic[] | null>(null);
  const summaryTimer = useRef<ReturnType<typeof setTimeout> | undefined>(undefined);

  useEffect(() => {
    const controller = new AbortController();
    pending.current = [];
    setResults(null);
    listResults({ model, deviceId, limit: RESULT_LIMIT }, controller.signal)
      .then((list) => {
        if (controller.signal.aborted) return;
        let next = list;
        for (const r of pending.current ?? []) next = addResult(next, r, RESULT_LIMIT);
        pending.current = null;
        setResults(next);
        setError(null);
      })
      .catch((err: unknown) => {
        if (isAbortError(err)) return;
        pending.current = null;
        setError(errorMessage(err));
      });
    return () => controller.abort();
  }, [model, deviceId, epoch]);

  useEffect(() => {
    const controller = new AbortController();
    getResultSummary({ model, deviceId }, controller.signal)
      .then((rows) => {
        if (!controller.signal.aborted) setSummary(rows);
      })
      .catch((err: unknown) => {
        if (isAbortError(err)) return;
        setError(errorMessage(err));
      });
    return () => controller.abort();
  }, [model, deviceId, epoch, summaryTick]);

  useEffect(() => () => clearTimeout(summaryTimer.current), []);

  useResultEvents((result) => {
    if (model !== undefined && result.model !== model) return;
    if (deviceId !== undefined && result.device_id !== deviceId) return;
    pending.current?.push(result);
    setResults((current) => (current === null ? current : addResult(current, result, RESULT_LIMIT)));
    if (summaryTimer.current === undefined) {
      summaryTimer.current = setTimeout(() => {
        summaryTimer.current = undefined;
        setSummaryTick((n) => n + 1);
      }, SUMMARY_REFRESH_MS);
    }
  });

  return { results, summary, error };
}
