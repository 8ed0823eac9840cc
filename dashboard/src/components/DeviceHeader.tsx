import type { ReactNode } from "react";
import type { DeviceWithIdentity } from "../accessApi";
import { absoluteTime, bytes, duration, EM_DASH, percent, relativeTime, temperature } from "../format";
import { RevokedBadge } from "./RevokedBadge";
import { StatusBadge } from "./StatusBadge";
import { TagChips } from "./TagChips";

function Stat({ label, value, detail, testId }: { label: string; value: string; detail?: string; testId: string }) {
  return (
    <div className="stat" data-testid={testId}>
      <div className="stat-label">{label}</div>
      <div className="stat-value">{value}</div>
      {detail && <div className="stat-detail">{detail}</div>}
    </div>
  );
}

export function DeviceHeader({
  device,
  now,
  actions,
}: {
  device: DeviceWithIdentity;
  now: number;
  /** Buttons shown at the end of the title row (e.g. Revoke for admins). */
  actions?: ReactNode;
}) {
  const t = device.telemetry;
  return (
    <header className="device-header" data-device-id={device.id}>
      <div className="device-title">
        <h1 data-testid="device-hostname">{device.hostname}</h1>
        <span data-testid="status">
          <StatusBadge status={device.status} />
        </span>
        {device.revoked_at && <RevokedBadge at={device.revoked_at} />}
        {actions && <div className="title-actions">{actions}</div>}
      </div>
      <dl className="meta">
        <div>
          <dt>Device ID</dt>
          <dd className="mono" data-testid="device-id">
            {device.id}
          </dd>
        </div>
        <div>
          <dt>Agent version</dt>
          <dd data-testid="agent-version">{device.agent_version ?? EM_DASH}</dd>
        </div>
        <div>
          <dt>Last seen</dt>
          <dd data-testid="last-seen">
            <time dateTime={device.last_seen ?? undefined} title={absoluteTime(device.last_seen)}>
              {relativeTime(device.last_seen, now)}
            </time>
          </dd>
        </div>
        <div>
          <dt>Enrolled</dt>
          <dd>
            <time dateTime={device.enrolled_at}>{absoluteTime(device.enrolled_at)}</time>
          </dd>
        </div>
        <div className="meta-wide">
          <dt>Tags</dt>
          <dd data-testid="tags">
            <TagChips tags={device.tags} />
          </dd>
        </div>
      </dl>
      {t && (
        <div className="stats">
          <Stat testId="stat-cpu" label="CPU" value={percent(t.cpu_percent)} />
          <Stat
            testId="stat-ram"
            label="RAM"
            value={percent(t.memory_percent)}
            detail={`${bytes(t.memory_used_bytes)} of ${bytes(t.memory_total_bytes)}`}
          />
          <Stat testId="stat-disk" label="Disk" value={percent(t.disk_percent)} />
          <Stat testId="stat-temperature" label="Temperature" value={temperature(t.temperature_c)} />
          <Stat testId="stat-load" label="Load (1 min)" value={t.load_1.toFixed(2)} />
          <Stat testId="stat-uptime" label="Uptime" value={duration(t.uptime_s)} />
        </div>
      )}
    </header>
  );
}
