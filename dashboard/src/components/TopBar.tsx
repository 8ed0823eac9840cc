import { Link, useLocation } from "react-router-dom";
import { clearToken } from "../auth";
import { LiveIndicator } from "./LiveIndicator";

interface NavEntry {
  to: string;
  label: string;
  /** Whether the current path belongs to this entry. */
  matches: (pathname: string) => boolean;
}

const NAV: readonly NavEntry[] = [
  { to: "/", label: "Devices", matches: (p) => p === "/" || p.startsWith("/devices/") },
  { to: "/models", label: "Models", matches: (p) => p === "/models" || p.startsWith("/models/") },
  { to: "/deployments", label: "Deployments", matches: (p) => p === "/deployments" || p.startsWith("/deployments/") },
  { to: "/results", label: "Results", matches: (p) => p === "/results" },
];

export function TopBar() {
  const { pathname } = useLocation();
  return (
    <header className="topbar">
      <div className="topbar-inner">
        <Link to="/" className="brand">
          edgefleet
        </Link>
        <nav className="nav" aria-label="Main">
          {NAV.map((entry) => {
            const active = entry.matches(pathname);
            return (
              <Link
                key={entry.to}
                to={entry.to}
                className={active ? "nav-link active" : "nav-link"}
                aria-current={active ? "page" : undefined}
              >
                {entry.label}
              </Link>
            );
          })}
        </nav>
        <div className="topbar-right">
          <LiveIndicator />
          <button type="button" className="button button-quiet" onClick={() => clearToken("signed-out")}>
            Sign out
          </button>
        </div>
      </div>
    </header>
  );
}
