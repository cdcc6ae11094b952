// Pipelines: build one from a source, a model and sinks, or paste a graph file; a drawing of
// its nodes and edges; start (inspecting or preview only), stop; per-node FPS, latency, queue
// depth, drops (a camera's own included), the state of each camera and receiver, updated live;
// and the live view.
import { useState } from "react";
import {
  ApiProblem,
  api,
  must,
  type GraphProblem,
  type PipelineView,
  type Schemas,
} from "../api/client";
import { useResource } from "../api/use";

type Report = Schemas["MetricsReport"];

export function Pipelines({ projectId }: { projectId: string }) {
  const path = { project_id: projectId };
  const pipelines = useResource(
    async () => (await must(api.GET("/api/projects/{project_id}/pipelines", { params: { path } }))).pipelines,
    [projectId],
  );
  return (
    <>
      <h1>Pipelines</h1>
      <Builder projectId={projectId} onCreated={pipelines.reload} />
      {pipelines.error && <p role="alert" className="error">{pipelines.error}</p>}
      {pipelines.value?.map((pipeline) => (
        <PipelineCard key={pipeline.id} pipeline={pipeline} onChange={pipelines.reload} />
      ))}
    </>
  );
}

function Builder({ projectId, onCreated }: { projectId: string; onCreated: () => void }) {
  const sources = useResource(async () => (await must(api.GET("/api/sources", { params: { query: { limit: 1000 } } }))).sources, []);
  const sinks = useResource(async () => (await must(api.GET("/api/sinks", { params: { query: { limit: 1000 } } }))).sinks, []);
  const models = useResource(
    async () =>
      (await must(api.GET("/api/projects/{project_id}/models", { params: { path: { project_id: projectId } } }))).models,
    [projectId],
  );
  const [form, setForm] = useState<"assembled" | "graph">("assembled");
  const [name, setName] = useState("");
  const [sourceId, setSourceId] = useState("");
  const [modelId, setModelId] = useState("");
  const [sinkIds, setSinkIds] = useState<string[]>([]);
  const [policy, setPolicy] = useState("");
  const [device, setDevice] = useState("");
  const devices = useResource(async () => (await must(api.GET("/api/devices"))).inference_devices, []);
  const [graph, setGraph] = useState("");
  const [problem, setProblem] = useState<ApiProblem>();
  const [status, setStatus] = useState<string>();

  async function create(event: React.FormEvent) {
    event.preventDefault();
    setProblem(undefined);
    const body: Schemas["PipelineBody"] =
      form === "graph"
        ? { name, graph }
        : {
            name,
            source_id: sourceId || sources.value?.[0]?.id || null,
            model_id: modelId || models.value?.[0]?.id || null,
            sink_ids: sinkIds,
            queue_policy: (policy || null) as Schemas["PipelineBody"]["queue_policy"],
            device: device || null,
          };
    try {
      const created = await must(
        api.POST("/api/projects/{project_id}/pipelines", { params: { path: { project_id: projectId } }, body }),
      );
      setStatus(`Pipeline “${created.name}” saved.`);
      setName("");
      onCreated();
    } catch (e) {
      if (e instanceof ApiProblem) setProblem(e);
      else setStatus(String(e));
    }
  }

  const fieldError = (field: string) => problem?.detail.includes(field);
  return (
    <section className="card" aria-labelledby="new-pipeline">
      <h2 id="new-pipeline">New pipeline</h2>
      <fieldset className="row">
        <legend>Build it from</legend>
        <label>
          <input type="radio" name="form" checked={form === "assembled"} onChange={() => setForm("assembled")} /> a
          source, a model and sinks
        </label>
        <label>
          <input type="radio" name="form" checked={form === "graph"} onChange={() => setForm("graph")} /> a graph
          file (YAML or JSON)
        </label>
      </fieldset>
      <form onSubmit={create}>
        <div className="row">
          <label>
            Pipeline name
            <input value={name} onChange={(e) => setName(e.target.value)} required />
          </label>
          {form === "assembled" ? (
            <>
              <label>
                Source
                <select
                  value={sourceId}
                  onChange={(e) => setSourceId(e.target.value)}
                  className={fieldError("source") ? "field-error" : undefined}
                >
                  {sources.value?.map((s) => (
                    <option key={s.id} value={s.id}>
                      {s.name} ({s.type})
                    </option>
                  ))}
                </select>
              </label>
              <label>
                Model
                <select
                  value={modelId}
                  onChange={(e) => setModelId(e.target.value)}
                  className={fieldError("model") ? "field-error" : undefined}
                >
                  {models.value?.map((m) => (
                    <option key={m.id} value={m.id}>
                      {m.name}
                    </option>
                  ))}
                </select>
              </label>
              <fieldset>
                <legend>Sinks</legend>
                {sinks.value?.map((s) => (
                  <label key={s.id} style={{ flexDirection: "row", gap: "0.3rem" }}>
                    <input
                      type="checkbox"
                      checked={sinkIds.includes(s.id)}
                      onChange={(e) =>
                        setSinkIds(e.target.checked ? [...sinkIds, s.id] : sinkIds.filter((id) => id !== s.id))
                      }
                    />
                    {s.name} ({s.type})
                  </label>
                ))}
                {sinks.value?.length === 0 && <a href="#/devices">Add a sink</a>}
              </fieldset>
              <label>
                Inference device
                <select
                  value={device}
                  onChange={(e) => setDevice(e.target.value)}
                  className={fieldError("device") ? "field-error" : undefined}
                >
                  <option value="">CPU (default)</option>
                  {devices.value?.map((d) => (
                    <option key={d.name} value={d.name}>
                      {d.name}
                    </option>
                  ))}
                </select>
              </label>
              <label>
                When a queue is full
                <select value={policy} onChange={(e) => setPolicy(e.target.value)}>
                  <option value="">default (drop the oldest frame of live sources)</option>
                  <option value="block">block: lose nothing</option>
                  <option value="drop_oldest">drop the oldest</option>
                </select>
              </label>
            </>
          ) : (
            <label style={{ flexBasis: "100%" }}>
              Graph
              <textarea
                rows={14}
                cols={90}
                value={graph}
                onChange={(e) => setGraph(e.target.value)}
                className={problem ? "field-error" : undefined}
                placeholder={"nodes:\n  - {id: camera, op: source.video_file, params: {path: /data/line.mp4}}\n..."}
              />
            </label>
          )}
        </div>
        <button type="submit">Save pipeline</button>
      </form>
      {problem && <Problems problem={problem} />}
      <p role="status">{status}</p>
    </section>
  );
}

/** An API error; a graph's problems one per line, naming node and field. */
function Problems({ problem }: { problem: ApiProblem }) {
  return (
    <div role="alert" className="error">
      <p>{problem.detail}</p>
      {problem.problems.length > 0 && (
        <ul>
          {problem.problems.map((p, i) => (
            <li key={i}>
              {p.node && <strong>node {p.node}</strong>} {p.field && <code>{p.field}</code>} {p.message}
              {p.line ? ` (line ${p.line}${p.column ? `, column ${p.column}` : ""})` : ""}
            </li>
          ))}
        </ul>
      )}
    </div>
  );
}

function PipelineCard({ pipeline, onChange }: { pipeline: PipelineView; onChange: () => void }) {
  const running = pipeline.status === "running";
  const active = useResource(
    async () =>
      running
        ? must(api.GET("/api/active-pipelines/{pipeline_id}", { params: { path: { pipeline_id: pipeline.id } } }))
        : undefined,
    [pipeline.id, running],
    running ? 1000 : undefined,
  );
  const [problem, setProblem] = useState<ApiProblem>();
  const [showLive, setShowLive] = useState(false);

  async function act(action: () => Promise<unknown>) {
    setProblem(undefined);
    try {
      await action();
      onChange();
      await active.reload();
    } catch (e) {
      if (e instanceof ApiProblem) setProblem(e);
    }
  }
  const start = (mode: "running" | "active") =>
    act(() => must(api.POST("/api/active-pipelines", { body: { pipeline_id: pipeline.id, mode } })));
  const switchMode = (mode: "running" | "active") =>
    act(() =>
      must(
        api.PUT("/api/active-pipelines/{pipeline_id}/mode", { params: { path: { pipeline_id: pipeline.id } }, body: { mode } }),
      ),
    );
  const stop = () =>
    act(async () => {
      await must(api.DELETE("/api/active-pipelines/{pipeline_id}", { params: { path: { pipeline_id: pipeline.id } } }));
      setShowLive(false);
    });
  const report = active.value?.metrics ?? undefined;
  const mode = active.value?.mode;

  return (
    <section className="card" aria-labelledby={`pipeline-${pipeline.id}`}>
      <h2 id={`pipeline-${pipeline.id}`}>
        {pipeline.name}{" "}
        <span className="badge" data-testid="pipeline-status">
          {running ? (mode === "active" ? "preview only" : "inspecting") : "stopped"}
        </span>
      </h2>
      <div className="row">
        {!running && (
          <>
            <button type="button" onClick={() => void start("running")}>
              Start
            </button>
            <button type="button" className="secondary" onClick={() => void start("active")}>
              Start preview only
            </button>
          </>
        )}
        {running && mode === "running" && (
          <button type="button" className="secondary" onClick={() => void switchMode("active")}>
            Pause inspection (keep the stream)
          </button>
        )}
        {running && mode === "active" && (
          <button type="button" className="secondary" onClick={() => void switchMode("running")}>
            Resume inspection
          </button>
        )}
        {running && (
          <>
            <button type="button" className="secondary" onClick={() => setShowLive(!showLive)} aria-expanded={showLive}>
              {showLive ? "Hide live view" : "Watch live"}
            </button>
            <button type="button" className="danger" onClick={() => void stop()}>
              Stop
            </button>
          </>
        )}
        {!running && (
          <button
            type="button"
            className="danger"
            onClick={() =>
              void act(() =>
                must(
                  api.DELETE("/api/projects/{project_id}/pipelines/{pipeline_id}", {
                    params: { path: { project_id: pipeline.project_id, pipeline_id: pipeline.id } },
                  }),
                ),
              )
            }
          >
            Delete pipeline
          </button>
        )}
      </div>
      {problem && <Problems problem={problem} />}
      <GraphDrawing report={report} graph={pipeline.graph} problems={problem?.problems ?? []} />
      {running && showLive && <LiveView pipelineId={pipeline.id} report={report} />}
      {report && <MetricsTable report={report} />}
    </section>
  );
}

/** Nodes and edges: from the running pipeline's metrics, or from a JSON graph. */
function GraphDrawing(props: { report?: Report; graph: unknown; problems: GraphProblem[] }) {
  let nodes: { id: string; op: string }[] = [];
  let edges: { from: string; to: string }[] = [];
  if (props.report) {
    nodes = props.report.nodes.map((n) => ({ id: n.id, op: n.op }));
    edges = props.report.edges.map((e) => ({ from: e.from.split(".")[0], to: e.to.split(".")[0] }));
  } else if (props.graph && typeof props.graph === "object") {
    const g = props.graph as { nodes?: { id: string; op: string }[]; edges?: { from: string; to: string }[] };
    nodes = g.nodes ?? [];
    edges = (g.edges ?? []).map((e) => ({ from: e.from.split(".")[0], to: e.to.split(".")[0] }));
  }
  if (nodes.length === 0) return <p>The graph is drawn here once the pipeline runs.</p>;
  // Columns by longest path from a source, rows in order within a column.
  const depth = new Map<string, number>(nodes.map((n) => [n.id, 0]));
  for (let pass = 0; pass < nodes.length; pass++) {
    for (const e of edges) depth.set(e.to, Math.max(depth.get(e.to) ?? 0, (depth.get(e.from) ?? 0) + 1));
  }
  const rows = new Map<number, number>();
  const place = new Map<string, { x: number; y: number }>();
  for (const n of nodes) {
    const column = depth.get(n.id) ?? 0;
    const row = rows.get(column) ?? 0;
    rows.set(column, row + 1);
    place.set(n.id, { x: 10 + column * 150, y: 10 + row * 54 });
  }
  const width = 10 + (Math.max(...depth.values()) + 1) * 150;
  const height = 10 + Math.max(...rows.values()) * 54;
  const bad = new Set(props.problems.map((p) => p.node));
  return (
    <svg className="graph" width={width} height={height} role="img" aria-label={`Graph: ${nodes.map((n) => n.id).join(", ")}`}>
      {edges.map((e, i) => {
        const a = place.get(e.from);
        const b = place.get(e.to);
        return a && b ? <line key={i} x1={a.x + 130} y1={a.y + 20} x2={b.x} y2={b.y + 20} /> : null;
      })}
      {nodes.map((n) => {
        const p = place.get(n.id);
        return p ? (
          <g key={n.id}>
            <rect x={p.x} y={p.y} width={130} height={40} rx={5} className={bad.has(n.id) ? "bad" : undefined} />
            <text x={p.x + 6} y={p.y + 16}>
              {n.id}
            </text>
            <text x={p.x + 6} y={p.y + 32}>
              {n.op}
            </text>
          </g>
        ) : null;
      })}
    </svg>
  );
}

/** A source's camera or a sink's receiver: online or offline (with why), and its outages so far. */
function endpointState(endpoint?: { state: string; outages: number; last_error?: string | null } | null) {
  if (!endpoint) return "";
  const why = endpoint.state !== "online" && endpoint.last_error ? `: ${endpoint.last_error}` : "";
  const outages = endpoint.outages ? ` (${endpoint.outages} outage${endpoint.outages === 1 ? "" : "s"})` : "";
  return `${endpoint.state}${why}${outages}`;
}

function MetricsTable({ report }: { report: Report }) {
  return (
    <table aria-label="Node metrics">
      <thead>
        <tr>
          <th scope="col">Node</th>
          <th scope="col">Operator</th>
          <th scope="col">Frames in / out</th>
          <th scope="col">FPS</th>
          <th scope="col">Latency p50 / p99</th>
          <th scope="col">Queue</th>
          <th scope="col">Drops</th>
          <th scope="col">Errors</th>
          <th scope="col">Camera / receiver</th>
        </tr>
      </thead>
      <tbody>
        {report.nodes.map((n) => (
          <tr key={n.id}>
            <td>{n.id}</td>
            <td>{n.op}</td>
            <td>
              {n.packets_in} / {n.packets_out}
            </td>
            <td>{n.fps?.toFixed(1) ?? "–"}</td>
            <td>{n.latency_ms ? `${n.latency_ms.p50.toFixed(1)} / ${n.latency_ms.p99.toFixed(1)} ms` : "–"}</td>
            <td>{n.queue ? `${n.queue.depth} of ${n.queue.capacity}` : "–"}</td>
            <td>{n.drops + (n.source?.dropped ?? 0)}</td>
            <td>{n.errors}</td>
            <td>{endpointState(n.source ?? n.sink)}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

/** The live view page of issue 11 (WebRTC, MJPEG fallback) with an FPS badge measured over the
 * frames the sinks received, not from one latency. */
function LiveView({ pipelineId, report }: { pipelineId: string; report?: Report }) {
  const [view, setView] = useState<"overlay" | "raw">("overlay");
  const sinks = report?.nodes.filter((n) => n.kind === "sink" && n.op !== "sink.preview") ?? [];
  const fps = sinks.length ? Math.min(...sinks.map((n) => n.fps ?? 0)) : undefined;
  const params = new URLSearchParams({ pipeline: pipelineId, view });
  return (
    <div className="live">
      <iframe title="Live view" src={`/live?${params}`} />
      <div>
        <p>
          <span className="fps" aria-live="off" data-testid="fps">
            {fps !== undefined ? `${fps.toFixed(1)} FPS` : "– FPS"}
          </span>{" "}
          inspected (frames reaching the sinks per second)
        </p>
        <label>
          View
          <select value={view} onChange={(e) => setView(e.target.value as "overlay" | "raw")}>
            <option value="overlay">heatmap overlay</option>
            <option value="raw">camera</option>
          </select>
        </label>
      </div>
    </div>
  );
}
