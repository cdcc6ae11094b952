// The app's frame: the header with the project picker, the navigation, and the screen the
// address's hash names (#/projects, #/projects/ID/dataset, ..., #/devices).
import { useEffect, useState } from "react";
import { api, must } from "./api/client";
import { useResource } from "./api/use";
import { Dataset } from "./screens/Dataset";
import { Devices } from "./screens/Devices";
import { Models } from "./screens/Models";
import { Pipelines } from "./screens/Pipelines";
import { Projects } from "./screens/Projects";
import { Training } from "./screens/Training";

/** The screens of a project, in the order of the workflow. */
const PROJECT_SCREENS = [
  ["dataset", "Dataset"],
  ["training", "Training"],
  ["models", "Models"],
  ["pipelines", "Pipelines"],
] as const;
type ProjectScreen = (typeof PROJECT_SCREENS)[number][0];

interface Route {
  screen: "projects" | "devices" | ProjectScreen;
  projectId?: string;
}

function parse(hash: string): Route {
  const parts = hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  if (parts[0] === "devices") return { screen: "devices" };
  if (parts[0] === "projects" && parts[1]) {
    const screen = PROJECT_SCREENS.find(([id]) => id === parts[2])?.[0] ?? "dataset";
    return { screen, projectId: decodeURIComponent(parts[1]) };
  }
  return { screen: "projects" };
}

export function App() {
  const [route, setRoute] = useState(() => parse(location.hash));
  useEffect(() => {
    const follow = () => setRoute(parse(location.hash));
    addEventListener("hashchange", follow);
    return () => removeEventListener("hashchange", follow);
  }, []);
  const project = useResource(
    async () =>
      route.projectId
        ? must(api.GET("/api/projects/{project_id}", { params: { path: { project_id: route.projectId } } }))
        : undefined,
    [route.projectId],
  );
  useEffect(() => {
    const name = project.value?.name;
    document.title = name ? `${name} · ${route.screen} · inspectflow` : `${route.screen} · inspectflow`;
  }, [project.value, route.screen]);

  return (
    <>
      <header className="top">
        <a className="brand" href="#/projects">
          inspectflow
        </a>
        <nav aria-label="Main">
          <a href="#/projects" aria-current={route.screen === "projects" ? "page" : undefined}>
            Projects
          </a>
          <a href="#/devices" aria-current={route.screen === "devices" ? "page" : undefined}>
            Devices and sources
          </a>
        </nav>
      </header>
      {route.projectId && (
        <nav className="project-nav" aria-label="Project">
          <span className="project-name">{project.value?.name ?? "…"}</span>
          {PROJECT_SCREENS.map(([id, label]) => (
            <a
              key={id}
              href={`#/projects/${encodeURIComponent(route.projectId ?? "")}/${id}`}
              aria-current={route.screen === id ? "page" : undefined}
            >
              {label}
            </a>
          ))}
        </nav>
      )}
      <main>
        {project.error && <p role="alert" className="error">{project.error}</p>}
        {route.screen === "projects" && <Projects />}
        {route.screen === "devices" && <Devices />}
        {route.projectId && route.screen === "dataset" && <Dataset projectId={route.projectId} />}
        {route.projectId && route.screen === "training" && <Training projectId={route.projectId} />}
        {route.projectId && route.screen === "models" && <Models projectId={route.projectId} />}
        {route.projectId && route.screen === "pipelines" && <Pipelines projectId={route.projectId} />}
      </main>
    </>
  );
}
