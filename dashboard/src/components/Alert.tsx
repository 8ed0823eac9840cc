import type { ReactNode } from "react";

export function Alert({ children, kind = "error" }: { children: ReactNode; kind?: "error" | "info" }) {
  return (
    <div className={`alert alert-${kind}`} role={kind === "error" ? "alert" : "status"}>
      {children}
    </div>
  );
}
