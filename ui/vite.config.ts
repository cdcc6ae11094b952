// Vite builds the UI into dist/, which `inspectflow serve` embeds (src/server/ui.rs).
import { defineConfig } from "vite";

export default defineConfig({
  esbuild: { jsx: "automatic" },
  build: { outDir: "dist", emptyOutDir: true, assetsDir: "assets", sourcemap: false },
});
