import { Navigate, Outlet, useLocation } from "react-router-dom";
import { useToken } from "../auth";
import { LiveProvider } from "../live";
import { TopBar } from "./TopBar";

export interface LoginRedirectState {
  from?: string;
}

/** Layout for signed-in pages: top bar, live event stream, or a redirect to /login. */
export function RequireAuth() {
  const token = useToken();
  const location = useLocation();
  if (token === null) {
    const state: LoginRedirectState = { from: location.pathname + location.search };
    return <Navigate to="/login" replace state={state} />;
  }
  return (
    // Keyed by token so a new session gets a fresh event stream.
    <LiveProvider key={token}>
      <TopBar />
      <main className="page">
        <Outlet />
      </main>
    </LiveProvider>
  );
}
