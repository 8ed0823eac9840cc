import { useState } from "react";
import { useAccess } from "../access";
import { revokeDevice, type DeviceWithIdentity } from "../accessApi";
import { ConfirmDialog } from "./ConfirmDialog";

/** The admin's Revoke action on a device page, behind a confirmation that says what it does. */
export function DeviceRevoke({
  device,
  onRevoked,
}: {
  device: DeviceWithIdentity;
  onRevoked: (device: DeviceWithIdentity) => void;
}) {
  const { isAdmin } = useAccess();
  const [open, setOpen] = useState(false);
  if (!isAdmin || device.revoked_at) return null;
  return (
    <>
      <button type="button" className="button button-danger" data-testid="device-revoke" onClick={() => setOpen(true)}>
        Revoke…
      </button>
      <ConfirmDialog
        open={open}
        title={`Revoke ${device.hostname}?`}
        confirmLabel="Revoke device"
        askReason
        testId="revoke-dialog"
        onClose={() => setOpen(false)}
        onConfirm={async (reason) => onRevoked(await revokeDevice(device.id, reason))}
      >
        <p>
          Its certificates go on the revocation list, the broker drops its connection and its device
          token stops working. It cannot reconnect or enroll again with this identity; to bring the
          hardware back, enroll it anew with a registration key.
        </p>
        <p>Its telemetry, logs, commands and results stay. This cannot be undone.</p>
      </ConfirmDialog>
    </>
  );
}
