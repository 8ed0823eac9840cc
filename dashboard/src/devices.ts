// Pure helpers for keeping a device list in sync with live events.
import type { DevicePublic } from "./api";

const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

export function compareDevices(a: DevicePublic, b: DevicePublic): number {
  return collator.compare(a.hostname, b.hostname) || collator.compare(a.id, b.id);
}

export function sortDevices(devices: readonly DevicePublic[]): DevicePublic[] {
  return [...devices].sort(compareDevices);
}

/** Replaces the device with the same id, or adds it; keeps the list sorted. */
export function upsertDevice(devices: readonly DevicePublic[], device: DevicePublic): DevicePublic[] {
  const index = devices.findIndex((d) => d.id === device.id);
  if (index === -1) return sortDevices([...devices, device]);
  const next = [...devices];
  next[index] = device;
  return devices[index]?.hostname === device.hostname ? next : sortDevices(next);
}

export function matchesFilter(device: DevicePublic, filter: string): boolean {
  const needle = filter.trim().toLowerCase();
  if (needle === "") return true;
  const haystack = [
    device.hostname,
    device.id,
    device.status,
    device.agent_version ?? "",
    ...Object.entries(device.tags).map(([k, v]) => `${k}=${v}`),
  ]
    .join(" ")
    .toLowerCase();
  return needle.split(/\s+/).every((part) => haystack.includes(part));
}
