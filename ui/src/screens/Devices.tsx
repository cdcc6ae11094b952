// Devices and sources: OpenVINO's devices, the cameras this machine has, and the stored sources
// and sinks (saving a source checks that it can be reached: the server answers 422 otherwise),
// each exported as and imported from YAML. A `disconnected` one is a placeholder without settings.
import { useState } from "react";
import { ApiProblem, api, authHeaders, download, must, type Endpoint } from "../api/client";
import { useResource } from "../api/use";

const SOURCE_TYPES = {
  video_file: "path",
  images_folder: "path",
  usb_camera: "device",
  ip_camera: "url",
  disconnected: "",
} as const;
const SINK_TYPES = { folder: "path", webhook: "url", mqtt: "host", disconnected: "" } as const;

export function Devices() {
  const devices = useResource(async () => must(api.GET("/api/devices")), []);
  return (
    <>
      <h1>Devices and sources</h1>
      <h2>Inference devices</h2>
      {devices.error && <p role="alert" className="error">{devices.error}</p>}
      <ul>
        {devices.value?.inference_devices.map((d) => (
          <li key={JSON.stringify(d)}>{describe(d)}</li>
        ))}
      </ul>
      <h2>Cameras</h2>
      {devices.value?.cameras.length ? (
        <ul>
          {devices.value.cameras.map((c) => (
            <li key={JSON.stringify(c)}>{describe(c)}</li>
          ))}
        </ul>
      ) : (
        <p>No camera found on this machine.</p>
      )}
      <Endpoints kind="sources" types={SOURCE_TYPES} />
      <Endpoints kind="sinks" types={SINK_TYPES} />
    </>
  );
}

function describe(value: unknown): string {
  if (!value || typeof value !== "object") return String(value);
  return Object.entries(value as Record<string, unknown>)
    .filter(([, v]) => v !== null && v !== undefined && typeof v !== "object")
    .map(([k, v]) => `${k.replace(/_/g, " ")}: ${v}`)
    .join(" · ");
}

function Endpoints({ kind, types }: { kind: "sources" | "sinks"; types: Record<string, string> }) {
  const list = useResource(async () => {
    const query = { params: { query: { limit: 1000 } } };
    return kind === "sources"
      ? (await must(api.GET("/api/sources", query))).sources
      : (await must(api.GET("/api/sinks", query))).sinks;
  }, [kind]);
  const singular = kind === "sources" ? "source" : "sink";
  const [type, setType] = useState(Object.keys(types)[0]);
  const [name, setName] = useState("");
  const [location, setLocation] = useState("");
  const [extra, setExtra] = useState("");
  const [problem, setProblem] = useState<string>();
  const [status, setStatus] = useState<string>();

  async function save(event: React.FormEvent) {
    event.preventDefault();
    setProblem(undefined);
    let config: Record<string, unknown>;
    try {
      config = extra.trim() ? JSON.parse(extra) : {};
      if (types[type]) config[types[type]] = location;
    } catch {
      setProblem("More settings: not valid JSON");
      return;
    }
    try {
      const body = { name, type, config };
      const saved: Endpoint =
        kind === "sources"
          ? await must(api.POST("/api/sources", { body }))
          : await must(api.POST("/api/sinks", { body }));
      setStatus(`${singular} “${saved.name}” saved.`);
      setName("");
      setLocation("");
      await list.reload();
    } catch (e) {
      setProblem(e instanceof ApiProblem ? e.detail : String(e));
    }
  }

  async function importYaml(file?: File) {
    if (!file) return;
    setProblem(undefined);
    const response = await fetch(`/api/${kind}:import`, {
      method: "POST",
      body: await file.text(),
      headers: { ...authHeaders(), "Content-Type": "application/yaml" },
    });
    const body = await response.json();
    if (!response.ok) {
      setProblem(body.detail ?? response.statusText);
      return;
    }
    setStatus(`${singular} “${body.name}” imported.`);
    await list.reload();
  }

  async function remove(endpoint: Endpoint) {
    try {
      const path = { params: { path: { source_id: endpoint.id, sink_id: endpoint.id } } };
      if (kind === "sources") await must(api.DELETE("/api/sources/{source_id}", path));
      else await must(api.DELETE("/api/sinks/{sink_id}", path));
      await list.reload();
    } catch (e) {
      setProblem(e instanceof ApiProblem ? e.detail : String(e));
    }
  }

  return (
    <section className="card" aria-labelledby={`${kind}-heading`}>
      <h2 id={`${kind}-heading`}>{kind === "sources" ? "Sources" : "Sinks"}</h2>
      <form className="inline" onSubmit={save} aria-label={`New ${singular}`}>
        <label>
          {singular} name
          <input value={name} onChange={(e) => setName(e.target.value)} required />
        </label>
        <label>
          {singular} type
          <select value={type} onChange={(e) => setType(e.target.value)}>
            {Object.keys(types).map((t) => (
              <option key={t} value={t}>
                {t.replace(/_/g, " ")}
              </option>
            ))}
          </select>
        </label>
        {types[type] && (
          <label>
            {singular} {types[type]}
            <input value={location} onChange={(e) => setLocation(e.target.value)} required />
          </label>
        )}
        <label>
          More settings (JSON)
          <input value={extra} onChange={(e) => setExtra(e.target.value)} placeholder='{"realtime": true}' />
        </label>
        <button type="submit">Save {singular}</button>
      </form>
      <label>
        Import a {singular.toLowerCase()} from YAML
        <input type="file" accept=".yaml,.yml,application/yaml,text/yaml" onChange={(e) => void importYaml(e.target.files?.[0])} />
      </label>
      {problem && <p role="alert" className="error">{problem}</p>}
      <p role="status">{status}</p>
      <table>
        <thead>
          <tr>
            <th scope="col">Name</th>
            <th scope="col">Type</th>
            <th scope="col">Settings</th>
            <th scope="col">Actions</th>
          </tr>
        </thead>
        <tbody>
          {list.value?.map((endpoint) => (
            <tr key={endpoint.id}>
              <td>{endpoint.name}</td>
              <td>{endpoint.type}</td>
              <td>
                <code>{JSON.stringify(endpoint.config)}</code>
              </td>
              <td>
                <button
                  type="button"
                  className="secondary"
                  aria-label={`Export ${endpoint.name} as YAML`}
                  onClick={() =>
                    void download(`/api/${kind}/${endpoint.id}:export`, "GET", `${endpoint.name}.yaml`).catch((e) =>
                      setProblem(String(e)),
                    )
                  }
                >
                  YAML
                </button>
                <button type="button" className="danger" onClick={() => void remove(endpoint)} aria-label={`Delete ${endpoint.name}`}>
                  Delete
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}
