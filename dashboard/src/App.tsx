import { BrowserRouter, Route, Routes } from "react-router-dom";
import { AccessProvider } from "./access";
import { RequireAuth } from "./components/RequireAuth";
import { Audit } from "./pages/Audit";
import { DeployPage } from "./pages/Deploy";
import { DeploymentPage } from "./pages/Deployment";
import { Deployments } from "./pages/Deployments";
import { DevicePage } from "./pages/Device";
import { Devices } from "./pages/Devices";
import { Fleet } from "./pages/Fleet";
import { Integrations } from "./pages/Integrations";
import { Login } from "./pages/Login";
import { Models } from "./pages/Models";
import { NotFound } from "./pages/NotFound";
import { Results } from "./pages/Results";
import { Security } from "./pages/Security";
import { Tokens } from "./pages/Tokens";
import { Users } from "./pages/Users";
import { WebhookDeliveriesPage, Webhooks } from "./pages/Webhooks";

export function App() {
  return (
    <BrowserRouter>
      <Routes>
        <Route path="/login" element={<Login />} />
        <Route
          element={
            // Reads /auth/me once per sign-in: pages hide what the role cannot do.
            <AccessProvider>
              <RequireAuth />
            </AccessProvider>
          }
        >
          <Route index element={<Devices />} />
          <Route path="/devices/:id" element={<DevicePage />} />
          <Route path="/models" element={<Models />} />
          <Route path="/models/:id/deploy" element={<DeployPage />} />
          <Route path="/deployments" element={<Deployments />} />
          <Route path="/deployments/:id" element={<DeploymentPage />} />
          <Route path="/results" element={<Results />} />
          <Route path="/fleet" element={<Fleet />} />
          {/* Admin pages: the server answers 403 to anyone else, and the page says so. */}
          <Route path="/users" element={<Users />} />
          <Route path="/tokens" element={<Tokens />} />
          <Route path="/audit" element={<Audit />} />
          <Route path="/integrations" element={<Integrations />} />
          <Route path="/webhooks" element={<Webhooks />} />
          <Route path="/webhooks/:id" element={<WebhookDeliveriesPage />} />
          <Route path="/security" element={<Security />} />
          <Route path="*" element={<NotFound />} />
        </Route>
      </Routes>
    </BrowserRouter>
  );
}
