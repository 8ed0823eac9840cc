import { useEffect, useMemo, useRef, useState } from "react";
import { useAccess } from "../access";
import { errorMessage, isAbortError, listDevices, type DevicePublic } from "../api";
import { matchesFilter, sortDevices, upsertDevice } from "../devices";
import { Alert } from "../components/Alert";
import { DeviceRow } from "../components/DeviceRow";
import { SendToTagDialog } from "../components/SendToTagDialog";
import { useNow } from "../hooks/useNow";
import { useDeviceEvents, useLive } from "../live";

export function Devices() {
  const { epoch } = useLive();
  const now = useNow(1000);
  const [devices, setDevices] = useState<DevicePublic[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [filter, setFilter] = useState("");
  const [tagDialogOpen, setTagDialogOpen] = useState(false);
  const { can } = useAccess();
  // Events that arrive while a list request is in flight are re-applied on top of its answer.
  const pending = useRef<DevicePublic[] | null>(null);

  useEffect(() => {
    // Runs on mount and whenever the event stream (re)opens, to catch up on anything missed.
    const controller = new AbortController();
    pending.current = [];
    listDevices(controller.signal)
      .then((list) => {
        if (controller.signal.aborted) return;
        let next = sortDevices(list);
        for (const device of pending.current ?? []) next = upsertDevice(next, device);
        pending.current = null;
        setDevices(next);
        setError(null);
      })
      .catch((err: unknown) => {
        if (isAbortError(err)) return;
        pending.current = null;
        setError(errorMessage(err));
      });
    return () => controller.abort();
  }, [epoch]);

  useDeviceEvents((device) => {
    pending.current?.push(device);
    setDevices((current) => (current === null ? current : upsertDevice(current, device)));
  });

  const visible = devices?.filter((d) => matchesFilter(d, filter)) ?? [];
  const online = devices?.filter((d) => d.status === "online").length ?? 0;
  const knownTags = useMemo(() => {
    const tags = new Set<string>();
    for (const device of devices ?? []) for (const [k, v] of Object.entries(device.tags)) tags.add(`${k}=${v}`);
    return [...tags].sort();
  }, [devices]);

  return (
    <div className="devices-page">
      <title>Devices · edgefleet</title>
      <div className="page-header">
        <div>
          <h1>Devices</h1>
          {devices !== null && (
            <p className="page-subtitle" data-testid="device-summary">
              {devices.length} {devices.length === 1 ? "device" : "devices"} · {online} online
            </p>
          )}
        </div>
        {devices !== null && devices.length > 0 && (
          <div className="page-tools">
            <input
              className="search"
              type="search"
              placeholder="Filter by name, id, status or tag"
              aria-label="Filter devices"
              value={filter}
              onChange={(e) => setFilter(e.target.value)}
            />
            {can("operator") && (
              <button type="button" className="button" onClick={() => setTagDialogOpen(true)}>
                Send to tag…
              </button>
            )}
          </div>
        )}
      </div>

      <SendToTagDialog open={tagDialogOpen} onClose={() => setTagDialogOpen(false)} knownTags={knownTags} />

      {error && <Alert>{error}</Alert>}

      {devices === null && !error && <p className="muted loading">Loading devices…</p>}

      {devices !== null && devices.length === 0 && (
        <div className="empty-state" data-testid="empty-state">
          <p>
            No devices yet. Create a key with <code>edgefleet keys create</code> and run{" "}
            <code>edgefleet-agent enroll &lt;token&gt;</code> on the device.
          </p>
        </div>
      )}

      {devices !== null && devices.length > 0 && (
        <div className="table-wrap">
          <table className="table devices-table" data-testid="devices-table">
            <thead>
              <tr>
                <th scope="col">Hostname</th>
                <th scope="col">Device ID</th>
                <th scope="col">Status</th>
                <th scope="col">Tags</th>
                <th scope="col">Last seen</th>
                <th scope="col" className="num">CPU</th>
                <th scope="col" className="num">RAM</th>
                <th scope="col" className="num">Temp.</th>
                <th scope="col">Config</th>
              </tr>
            </thead>
            <tbody>
              {visible.map((device) => (
                <DeviceRow key={device.id} device={device} now={now} />
              ))}
              {visible.length === 0 && (
                <tr className="no-match">
                  <td colSpan={9}>No devices match “{filter.trim()}”.</td>
                </tr>
              )}
            </tbody>
          </table>
        </div>
      )}
    </div>
  );
}
