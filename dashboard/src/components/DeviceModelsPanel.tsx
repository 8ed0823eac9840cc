import { Link } from "react-router-dom";
import type { DevicePublic } from "../api";
import { EM_DASH } from "../format";
import { PhaseBadge } from "./ModelBadges";
import { ProgressBar } from "./ProgressBar";

/** The models on a device: what it was told to run, how far it got, and what serves now. */
export function DeviceModelsPanel({ device }: { device: DevicePublic }) {
  const reports = Object.values(device.models ?? {}).sort((a, b) => a.name.localeCompare(b.name));
  const reported = new Set(reports.map((r) => r.name));
  const waiting = (device.desired_models ?? []).filter((m) => !reported.has(m.name));

  return (
    <section className="panel models-panel" aria-labelledby="device-models-heading" data-testid="device-models-panel">
      <div className="section-header">
        <h2 id="device-models-heading">Models</h2>
      </div>
      {reports.length === 0 && waiting.length === 0 ? (
        <p className="muted" data-testid="device-models-empty">
          No models are assigned to this device. Deploy one from the <Link to="/models">Models</Link> page.
        </p>
      ) : (
        <div className="table-wrap">
          <table className="table device-models-table" data-testid="device-models-table">
            <thead>
              <tr>
                <th scope="col">Model</th>
                <th scope="col">Desired</th>
                <th scope="col">Phase</th>
                <th scope="col">Active version</th>
                <th scope="col">Healthy</th>
                <th scope="col" className="num">Worker restarts</th>
                <th scope="col">Detail</th>
              </tr>
            </thead>
            <tbody>
              {reports.map((m) => (
                <tr key={m.name} data-model={m.name} data-phase={m.phase}>
                  <td className="mono">
                    <Link to={`/results?model=${encodeURIComponent(m.name)}`}>{m.name}</Link>
                  </td>
                  <td>
                    {m.version} <span className="muted small">release {m.release}</span>
                  </td>
                  <td>
                    <PhaseBadge phase={m.phase} />
                    {m.phase === "downloading" && (
                      <ProgressBar
                        testId="model-download-progress"
                        label={`Download progress of ${m.name}`}
                        done={m.bytes_done}
                        total={m.bytes_total}
                      />
                    )}
                  </td>
                  <td data-testid="active-version">
                    {m.active_version === null ? (
                      <span className="muted">{EM_DASH}</span>
                    ) : (
                      <>
                        {m.active_version} <span className="muted small">release {m.active_release ?? "?"}</span>
                      </>
                    )}
                  </td>
                  <td data-testid="model-healthy">
                    {m.healthy ? <span className="text-good">healthy</span> : <span className="text-bad">not healthy</span>}
                  </td>
                  <td className="num" data-testid="worker-restarts">
                    {m.worker_restarts}
                  </td>
                  <td className="command-detail">{m.detail ?? ""}</td>
                </tr>
              ))}
              {waiting.map((m) => (
                <tr key={m.name} data-model={m.name} data-phase="">
                  <td className="mono">{m.name}</td>
                  <td className="mono small muted">{m.release_id}</td>
                  <td colSpan={5} className="muted">
                    Not reported by the device yet.
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}
