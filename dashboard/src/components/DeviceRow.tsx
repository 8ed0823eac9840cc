import { Link } from "react-router-dom";
import type { DeviceWithIdentity } from "../accessApi";
import { absoluteTime, percent, relativeTime, temperature } from "../format";
import { ConfigSync } from "./ConfigSync";
import { RevokedBadge } from "./RevokedBadge";
import { StatusBadge } from "./StatusBadge";
import { TagChips } from "./TagChips";

export function DeviceRow({ device, now }: { device: DeviceWithIdentity; now: number }) {
  const t = device.telemetry;
  return (
    <tr data-device-id={device.id} className={`row-${device.status}`}>
      <td data-testid="hostname" data-label="Hostname">
        <Link to={`/devices/${encodeURIComponent(device.id)}`} className="device-link">
          {device.hostname}
        </Link>
      </td>
      <td data-testid="device-id" data-label="Device ID" className="mono">
        {device.id}
      </td>
      <td data-testid="status" data-label="Status">
        <StatusBadge status={device.status} />
        {device.revoked_at && (
          <>
            {" "}
            <RevokedBadge at={device.revoked_at} />
          </>
        )}
      </td>
      <td data-testid="tags" data-label="Tags">
        <TagChips tags={device.tags} />
      </td>
      <td data-testid="last-seen" data-label="Last seen">
        <time dateTime={device.last_seen ?? undefined} title={absoluteTime(device.last_seen)}>
          {relativeTime(device.last_seen, now)}
        </time>
      </td>
      <td data-testid="cpu" data-label="CPU" className="num">
        {percent(t?.cpu_percent)}
      </td>
      <td data-testid="ram" data-label="RAM" className="num">
        {percent(t?.memory_percent)}
      </td>
      <td data-testid="temperature" data-label="Temp." className="num">
        {temperature(t?.temperature_c)}
      </td>
      <td data-label="Config" className="nowrap">
        <ConfigSync device={device} />
      </td>
    </tr>
  );
}
