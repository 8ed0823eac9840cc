// Whether a device has caught up with its desired state.
import type { DevicePublic } from "./api";

export type SyncState = "in-sync" | "lagging" | "not-applied";

export interface ConfigSyncInfo {
  state: SyncState;
  label: string;
}

type SyncFields = Pick<DevicePublic, "desired_generation" | "reported_generation" | "reported_applied">;

export function configSync(device: SyncFields): ConfigSyncInfo {
  const desired = device.desired_generation;
  const reported = device.reported_generation;
  // Generation 0 means no desired state was ever set, so a device that never reported has nothing to catch up on.
  if (reported === desired || (desired === 0 && reported === null)) {
    if (reported !== null && device.reported_applied === false) {
      return { state: "not-applied", label: `not applied (g${desired})` };
    }
    return { state: "in-sync", label: "in sync" };
  }
  return { state: "lagging", label: `lagging (g${reported ?? "–"} → g${desired})` };
}
