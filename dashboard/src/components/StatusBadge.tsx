import type { DeviceStatus } from "../api";

/** The device's connection status; the text is exactly the status value. */
export function StatusBadge({ status }: { status: DeviceStatus }) {
  return (
    <span className={`badge status-badge status-${status}`} data-status={status}>
      {status}
    </span>
  );
}
