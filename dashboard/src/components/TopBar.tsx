import { Link, useLocation } from "react-router-dom";
import { clearToken } from "../auth";
import { LiveIndicator } from "./LiveIndicator";

export function TopBar() {
  const { pathname } = useLocation();
  const onDevices = pathname === "/" || pathname.startsWith("/devices/");
  return (
    <header className="topbar">
      <div className="topbar-inner">
        <Link to="/" className="brand">
          edgefleet
        </Link>
        <nav className="nav" aria-label="Main">
          <Link to="/" className={onDevices ? "nav-link active" : "nav-link"} aria-current={onDevices ? "page" : undefined}>
            Devices
          </Link>
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
