// Projects: list, create, rename, delete.
import { useState } from "react";
import { api, must, type Project } from "../api/client";
import { useResource } from "../api/use";

export function Projects() {
  const projects = useResource(
    async () => (await must(api.GET("/api/projects", { params: { query: { limit: 200 } } }))).projects,
    [],
  );
  const [name, setName] = useState("");
  const [description, setDescription] = useState("");
  const [status, setStatus] = useState<string>();
  const [error, setError] = useState<string>();

  async function create(event: React.FormEvent) {
    event.preventDefault();
    setError(undefined);
    try {
      const project = await must(api.POST("/api/projects", { body: { name, description } }));
      setName("");
      setDescription("");
      setStatus(`Project “${project.name}” created.`);
      location.hash = `#/projects/${project.id}/dataset`;
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    }
  }

  return (
    <>
      <h1>Projects</h1>
      <section className="card" aria-labelledby="new-project">
        <h2 id="new-project">New project</h2>
        <form className="inline" onSubmit={create}>
          <label>
            Name
            <input value={name} onChange={(e) => setName(e.target.value)} required maxLength={200} />
          </label>
          <label>
            Description (optional)
            <input value={description} onChange={(e) => setDescription(e.target.value)} maxLength={4000} />
          </label>
          <button type="submit">Create project</button>
        </form>
        {error && <p role="alert" className="error">{error}</p>}
        <p role="status">{status}</p>
      </section>
      {projects.error && <p role="alert" className="error">{projects.error}</p>}
      <table>
        <caption className="visually-left">Every project</caption>
        <thead>
          <tr>
            <th scope="col">Name</th>
            <th scope="col">Description</th>
            <th scope="col">Created</th>
            <th scope="col">Actions</th>
          </tr>
        </thead>
        <tbody>
          {projects.value?.map((project) => (
            <ProjectRow key={project.id} project={project} onChange={projects.reload} setStatus={setStatus} />
          ))}
        </tbody>
      </table>
      {projects.value?.length === 0 && <p>No project yet: create one above.</p>}
    </>
  );
}

function ProjectRow(props: { project: Project; onChange: () => void; setStatus: (s: string) => void }) {
  const { project } = props;
  const [renaming, setRenaming] = useState(false);
  const [name, setName] = useState(project.name);
  const [error, setError] = useState<string>();
  const path = { project_id: project.id };

  async function rename(event: React.FormEvent) {
    event.preventDefault();
    try {
      await must(api.PATCH("/api/projects/{project_id}", { params: { path }, body: { name } }));
      setRenaming(false);
      props.setStatus(`Renamed to “${name}”.`);
      props.onChange();
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    }
  }
  async function remove() {
    if (!confirm(`Delete project “${project.name}” with its media, models and pipelines?`)) return;
    try {
      await must(api.DELETE("/api/projects/{project_id}", { params: { path } }));
      props.setStatus(`Project “${project.name}” deleted.`);
      props.onChange();
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    }
  }

  return (
    <tr>
      <td>
        {renaming ? (
          <form className="inline" onSubmit={rename}>
            <label>
              New name for {project.name}
              <input value={name} onChange={(e) => setName(e.target.value)} required autoFocus />
            </label>
            <button type="submit">Save</button>
            <button type="button" className="secondary" onClick={() => setRenaming(false)}>
              Cancel
            </button>
          </form>
        ) : (
          <a href={`#/projects/${project.id}/dataset`}>{project.name}</a>
        )}
        {error && <span role="alert" className="error"> {error}</span>}
      </td>
      <td>{project.description}</td>
      <td>{new Date(project.created_at).toLocaleString()}</td>
      <td className="row">
        <button type="button" className="secondary" onClick={() => setRenaming(true)} aria-label={`Rename ${project.name}`}>
          Rename
        </button>
        <button type="button" className="danger" onClick={remove} aria-label={`Delete ${project.name}`}>
          Delete
        </button>
      </td>
    </tr>
  );
}
