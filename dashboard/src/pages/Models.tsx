import { useEffect, useState } from "react";
import { Link } from "react-router-dom";
import { IfRole } from "../access";
import { errorMessage, isAbortError } from "../api";
import { Alert } from "../components/Alert";
import { ModelUploadForm } from "../components/ModelUploadForm";
import { absoluteTime, bytes, relativeTime } from "../format";
import { useNow } from "../hooks/useNow";
import { useLive } from "../live";
import { releaseSize } from "../models";
import { listModels, type ModelReleasePublic } from "../modelsApi";

function plural(count: number, noun: string): string {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function ReleaseRow({ release, now }: { release: ModelReleasePublic; now: number }) {
  const expired = Date.parse(release.expires_at) <= now;
  return (
    <tr data-release-id={release.id} data-model-name={release.name} data-version={release.version}>
      <td data-testid="model-name" className="mono">
        {release.name}
      </td>
      <td data-testid="model-version">{release.version}</td>
      <td data-testid="model-release" className="num">
        {release.release}
        {release.rollback_of && (
          <span className="muted small" title={`Re-signed from ${release.rollback_of} for a rollback`}>
            {" "}
            (rollback)
          </span>
        )}
      </td>
      <td data-testid="model-runtime">{release.runtime}</td>
      <td data-testid="model-size" className="num" title={`${release.files.map((f) => `${f.name} (${f.role})`).join(", ")}`}>
        {bytes(releaseSize(release))}
      </td>
      <td data-testid="model-encrypted">{release.encrypted ? "encrypted" : "no"}</td>
      <td data-testid="model-expiry" className="nowrap" title={absoluteTime(release.expires_at)}>
        {expired ? <span className="text-bad">expired</span> : absoluteTime(release.expires_at)}
      </td>
      <td data-testid="model-key-id" className="mono small">
        {release.key_id}
      </td>
      <td className="nowrap muted" title={absoluteTime(release.created_at)}>
        {relativeTime(release.created_at, now)} by {release.created_by}
      </td>
      <td className="nowrap">
        <span className="row-actions">
          <IfRole needed="operator">
            <Link
              className="button button-quiet"
              to={`/models/${encodeURIComponent(release.id)}/deploy`}
              aria-label={`Deploy ${release.name} ${release.version}`}
              data-testid="deploy-link"
            >
              Deploy…
            </Link>
          </IfRole>
          <Link
            className="button button-quiet"
            to={`/results?model=${encodeURIComponent(release.name)}`}
            aria-label={`Results of ${release.name}`}
          >
            Results
          </Link>
        </span>
      </td>
    </tr>
  );
}

/** Model releases, newest first, and the upload form. */
export function Models() {
  const { epoch } = useLive();
  const now = useNow(10_000);
  const [releases, setReleases] = useState<ModelReleasePublic[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [filter, setFilter] = useState("");

  useEffect(() => {
    const controller = new AbortController();
    listModels(undefined, controller.signal)
      .then((list) => {
        if (controller.signal.aborted) return;
        setReleases(list);
        setError(null);
      })
      .catch((err: unknown) => {
        if (isAbortError(err)) return;
        setError(errorMessage(err));
      });
    return () => controller.abort();
  }, [epoch]);

  function added(release: ModelReleasePublic): void {
    setReleases((current) => [release, ...(current ?? []).filter((r) => r.id !== release.id)]);
  }

  const needle = filter.trim().toLowerCase();
  const visible = (releases ?? []).filter(
    (r) => needle === "" || `${r.name} ${r.version} ${r.runtime}`.toLowerCase().includes(needle),
  );

  return (
    <div className="models-page">
      <title>Models · edgefleet</title>
      <div className="page-header">
        <div>
          <h1>Models</h1>
          {releases !== null && (
            <p className="page-subtitle" data-testid="model-summary">
              {plural(releases.length, "release")} of {plural(new Set(releases.map((r) => r.name)).size, "model")}
            </p>
          )}
        </div>
        {releases !== null && releases.length > 0 && (
          <div className="page-tools">
            <input
              className="search"
              type="search"
              placeholder="Filter by name, version or runtime"
              aria-label="Filter model releases"
              value={filter}
              onChange={(e) => setFilter(e.target.value)}
            />
          </div>
        )}
      </div>

      {error && <Alert>{error}</Alert>}
      {releases === null && !error && <p className="muted loading">Loading models…</p>}
      {releases !== null && releases.length === 0 && (
        <div className="empty-state" data-testid="models-empty">
          <p>
            No models yet. Upload one below, or with <code>edgefleet models push FILE --name N --version V --runtime R</code>.
          </p>
        </div>
      )}
      {releases !== null && releases.length > 0 && (
        <div className="table-wrap">
          <table className="table models-table" data-testid="models-table">
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Version</th>
                <th scope="col" className="num">Release</th>
                <th scope="col">Runtime</th>
                <th scope="col" className="num">Size</th>
                <th scope="col">Encrypted</th>
                <th scope="col">Expires</th>
                <th scope="col">Key ID</th>
                <th scope="col">Uploaded</th>
                <th scope="col">
                  <span className="visually-hidden">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {visible.map((release) => (
                <ReleaseRow key={release.id} release={release} now={now} />
              ))}
              {visible.length === 0 && (
                <tr className="no-match">
                  <td colSpan={10}>No releases match “{filter.trim()}”.</td>
                </tr>
              )}
            </tbody>
          </table>
        </div>
      )}

      <IfRole needed="operator" what="upload or deploy models">
        <section className="panel">
          <ModelUploadForm onUploaded={added} />
        </section>
      </IfRole>
    </div>
  );
}
