import { BrowserRouter, Route, Routes } from "react-router-dom";
import { RequireAuth } from "./components/RequireAuth";
import { DeployPage } from "./pages/Deploy";
import { DeploymentPage } from "./pages/Deployment";
import { Deployments } from "./pages/Deployments";
import { DevicePage } from "./pages/Device";
import { Devices } from "./pages/Devices";
import { Login } from "./pages/Login";
import { Models } from "./pages/Models";
import { NotFound } from "./pages/NotFound";
import { Results } from "./pages/Results";

export function App() {
  return (
    <BrowserRouter>
      <Routes>
        <Route path="/login" element={<Login />} />
        <Route element={<RequireAuth />}>
          <Route index element={<Devices />} />
          <Route path="/devices/:id" element={<DevicePage />} />
          <Route path="/models" element={<Models />} />
          <Route path="/models/:id/deploy" element={<DeployPage />} />
          <Route path="/deployments" element={<Deployments />} />
          <Route path="/deployments/:id" element={<DeploymentPage />} />
          <Route path="/results" element={<Results />} />
          <Route path="*" element={<NotFound />} />
        </Route>
      </Routes>
    </BrowserRouter>
  );
}
