import { Link, useLocation } from "react-router-dom";
import { useAccess } from "../access";
import { clearToken } from "../auth";
import { LiveIndicator } from "./LiveIndicator";

interface NavEntry {
  to: string;
  label: string;
  /** Whether the current path belongs to this entry. */
  matches: (pathname: string) => boolean;
}

const under = (base: string) => (p: string) => p === base || p.startsWith(`${base}/`);

const NAV: readonly NavEntry[] = [
  { to: "/", label: "Devices", matches: (p) => p === "/" || p.startsWith("/devices/") },
  { to: "/models", label: "Models", matches: under("/models") },
  { to: "/deployments", label: "Deployments", matches: under("/deployments") },
  { to: "/results", label: "Results", matches: (p) => p === "/results" },
  { to: "/fleet", label: "Fleet", matches: (p) => p === "/fleet" },
];

/** Access management: listed for fleet-wide admins only (the server refuses everyone else). */
const ADMIN_NAV: readonly NavEntry[] = [
  { to: "/users", label: "Users", matches: under("/users") },
  { to: "/tokens", label: "Tokens", matches: under("/tokens") },
  { to: "/integrations", label: "Integrations", matches: under("/integrations") },
  { to: "/webhooks", label: "Webhooks", matches: under("/webhooks") },
  { to: "/audit", label: "Audit", matches: under("/audit") },
  { to: "/security", label: "Security", matches: under("/security") },
];

function NavLink({ entry, pathname }: { entry: NavEntry; pathname: string }) {
  const active = entry.matches(pathname);
  return (
    <Link to={entry.to} className={active ? "nav-link active" : "nav-link"} aria-current={active ? "page" : undefined}>
      {entry.label}
    </Link>
  );
}

export function TopBar() {
  const { pathname } = useLocation();
  const { me, isAdmin, error } = useAccess();
  return (
    <header className="topbar">
      <div className="topbar-inner">
        <Link to="/" className="brand">
          edgefleet
        </Link>
        <nav className="nav" aria-label="Main">
          {NAV.map((entry) => (
            <NavLink key={entry.to} entry={entry} pathname={pathname} />
          ))}
          {isAdmin && <span className="nav-separator" aria-hidden="true" />}
          {isAdmin && ADMIN_NAV.map((entry) => <NavLink key={entry.to} entry={entry} pathname={pathname} />)}
        </nav>
        <div className="topbar-right">
          <LiveIndicator />
          {me !== null && (
            <span className="whoami" data-testid="whoami" data-role={me.role} title={me.tag ? `Limited to devices tagged ${me.tag}` : undefined}>
              {me.name} <span className="badge tone-idle role-badge">{me.role}</span>
            </span>
          )}
          {me === null && error !== null && (
            <span className="whoami text-bad" role="status" title={error}>
              role unknown
            </span>
          )}
          <button type="button" className="button button-quiet" onClick={() => clearToken("signed-out")}>
            Sign out
          </button>
        </div>
      </div>
    </header>
  );
}
