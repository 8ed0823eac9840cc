import { defineConfig } from "vite";
import react from "@vitejs/plugin-react";

// Served by fleet_service from the same origin: index.html at "/", assets under "/assets/".
// During `npm run dev`, API calls are proxied to a locally running service.
export default defineConfig({
  base: "/",
  plugins: [react()],
  build: {
    outDir: "dist",
    assetsDir: "assets",
    sourcemap: false,
    target: "es2022",
  },
  server: {
    proxy: {
      "/api": { target: "http://127.0.0.1:8000", changeOrigin: false },
    },
  },
});
