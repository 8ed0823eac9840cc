import type { DevicePublic } from "../api";
import { configSync } from "../config";

type Props = { device: Pick<DevicePublic, "desired_generation" | "reported_generation" | "reported_applied" | "reported_detail"> };

/** "in sync", or "lagging (g3 → g5)" while the device has not reported the desired generation. */
export function ConfigSync({ device }: Props) {
  const { state, label } = configSync(device);
  return (
    <span
      className={`sync sync-${state}`}
      data-testid="config-sync"
      data-state={state}
      title={device.reported_detail ?? undefined}
    >
      {label}
    </span>
  );
}
