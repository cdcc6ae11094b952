// Training: the families and their settings from /api/trainable-models (the server's own
// schema of each setting), a job's progress bar and stage from its event stream, its log, and
// cancel.
import { useEffect, useState } from "react";
import { api, authHeaders, must, token, type Job, type Schemas } from "../api/client";
import { useResource, useSnapshots } from "../api/use";

type ParameterSchema = {
  type?: string | string[];
  enum?: string[];
  oneOf?: { const?: string }[];
  default?: unknown;
  minimum?: number;
  maximum?: number;
  multipleOf?: number;
  description?: string;
};

export function Training({ projectId }: { projectId: string }) {
  const families = useResource(async () => (await must(api.GET("/api/trainable-models"))).trainable_models, []);
  const jobs = useResource(
    async () =>
      (await must(api.GET("/api/jobs", { params: { query: { limit: 1000 } } }))).jobs
        .filter((job) => job.project_id === projectId)
        .reverse(),
    [projectId],
  );
  const snapshots = useSnapshots(projectId);
  const [snapshot, setSnapshot] = useState("");
  const [family, setFamily] = useState<string>();
  const chosen = families.value?.find((f) => f.name === family) ?? families.value?.find((f) => f.recommended);
  const [values, setValues] = useState<Record<string, string>>({});
  const [error, setError] = useState<string>();
  const [watching, setWatching] = useState<string>();

  async function train(event: React.FormEvent) {
    event.preventDefault();
    if (!chosen) return;
    setError(undefined);
    const body: Record<string, unknown> = { model_name: chosen.name };
    if (snapshot) body.dataset_snapshot_id = snapshot;
    for (const [name, raw] of Object.entries(values)) {
      const schema = chosen.parameters[name] as ParameterSchema | undefined;
      if (!schema || raw === "") continue;
      const types = Array.isArray(schema.type) ? schema.type : [schema.type];
      body[name] = types.includes("integer") || types.includes("number") ? Number(raw) : raw;
    }
    try {
      const job = await must(
        api.POST("/api/projects/{project_id}/train", {
          params: { path: { project_id: projectId } },
          body: body as Schemas["TrainRequest"],
        }),
      );
      setWatching(job.id);
      await jobs.reload();
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    }
  }

  const current = jobs.value?.find((job) => job.id === watching) ?? jobs.value?.find((job) => !isFinal(job));

  return (
    <>
      <h1>Training</h1>
      <section className="card" aria-labelledby="train-new">
        <h2 id="train-new">Train a model</h2>
        <form onSubmit={train}>
          <div className="row">
            <label>
              Model family
              <select value={chosen?.name ?? ""} onChange={(e) => setFamily(e.target.value)}>
                {families.value?.map((f) => (
                  <option key={f.name} value={f.name}>
                    {f.name}
                    {f.recommended ? " (recommended)" : ""}
                  </option>
                ))}
              </select>
            </label>
            <label>
              Dataset
              <select value={snapshot} onChange={(e) => setSnapshot(e.target.value)}>
                <option value="">the project&apos;s images now</option>
                {snapshots.value?.map((s) => (
                  <option key={s.id} value={s.id}>
                    snapshot of {new Date(s.created_at).toLocaleString()} ({s.count} images)
                  </option>
                ))}
              </select>
            </label>
            {chosen &&
              Object.entries(chosen.parameters).map(([name, raw]) => (
                <Parameter
                  key={`${chosen.name}-${name}`}
                  name={name}
                  schema={raw as ParameterSchema}
                  value={values[name] ?? ""}
                  onChange={(value) => setValues({ ...values, [name]: value })}
                />
              ))}
            <button type="submit">Start training</button>
          </div>
          {chosen && <p>{chosen.description}</p>}
        </form>
        {error && <p role="alert" className="error">{error}</p>}
      </section>
      {current && <JobProgress key={current.id} job={current} onEnded={jobs.reload} />}
      <h2>Jobs</h2>
      <table>
        <thead>
          <tr>
            <th scope="col">Submitted</th>
            <th scope="col">Family</th>
            <th scope="col">Status</th>
            <th scope="col">Message</th>
          </tr>
        </thead>
        <tbody>
          {jobs.value?.map((job) => (
            <tr key={job.id}>
              <td>{new Date(job.created_at).toLocaleString()}</td>
              <td>{job.payload.model_name}</td>
              <td>
                <button type="button" className="secondary" onClick={() => setWatching(job.id)}>
                  {job.status} {job.progress}%
                </button>
              </td>
              <td>{job.message}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </>
  );
}

function isFinal(job: Job) {
  return job.status === "completed" || job.status === "failed" || job.status === "canceled";
}

/** One training setting, as an input its schema describes. */
function Parameter(props: { name: string; schema: ParameterSchema; value: string; onChange: (v: string) => void }) {
  const { schema } = props;
  const choices = schema.enum ?? schema.oneOf?.map((o) => o.const).filter((c): c is string => !!c);
  const types = Array.isArray(schema.type) ? schema.type : [schema.type];
  const label = props.name.replace(/_/g, " ");
  const placeholder = schema.default === null || schema.default === undefined ? "automatic" : String(schema.default);
  return (
    <label title={schema.description}>
      {label}
      {choices && choices.length ? (
        <select value={props.value} onChange={(e) => props.onChange(e.target.value)}>
          <option value="">default ({placeholder})</option>
          {choices.map((choice) => (
            <option key={choice} value={choice}>
              {choice}
            </option>
          ))}
        </select>
      ) : (
        <input
          type={types.includes("integer") || types.includes("number") ? "number" : "text"}
          min={schema.minimum}
          max={schema.maximum}
          step={schema.multipleOf ?? (types.includes("integer") ? 1 : "any")}
          placeholder={placeholder}
          value={props.value}
          onChange={(e) => props.onChange(e.target.value)}
        />
      )}
    </label>
  );
}

/** A job's progress and log, followed live (server-sent events; polling when a token is set,
 * since EventSource cannot send one). */
function JobProgress({ job: initial, onEnded }: { job: Job; onEnded: () => void }) {
  const [job, setJob] = useState(initial);
  const [log, setLog] = useState<string[]>([]);
  const [error, setError] = useState<string>();

  useEffect(() => {
    if (isFinal(initial)) return;
    if (token()) {
      const timer = setInterval(async () => {
        const next = await must(api.GET("/api/jobs/{job_id}", { params: { path: { job_id: initial.id } } }));
        setJob(next);
        if (isFinal(next)) {
          clearInterval(timer);
          onEnded();
        }
      }, 500);
      return () => clearInterval(timer);
    }
    const progress = new EventSource(`/api/jobs/${initial.id}/progress`);
    progress.addEventListener("progress", (event) => {
      const next = JSON.parse((event as MessageEvent).data) as Job;
      setJob(next);
      if (isFinal(next)) {
        progress.close();
        onEnded();
      }
    });
    return () => progress.close();
  }, [initial, onEnded]);

  useEffect(() => {
    if (token()) return;
    const logs = new EventSource(`/api/jobs/${initial.id}/logs`);
    logs.addEventListener("log", (event) => setLog((lines) => [...lines.slice(-500), (event as MessageEvent).data]));
    logs.onerror = () => logs.close();
    return () => logs.close();
  }, [initial.id]);

  async function cancel() {
    try {
      setJob(await must(api.POST("/api/jobs/{job_id}:cancel", { params: { path: { job_id: job.id } } })));
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    }
  }

  return (
    <section className="card" aria-labelledby="job-progress">
      <h2 id="job-progress">
        {job.payload.model_name} training: <span id="job-status">{job.status}</span>
      </h2>
      <div className="row">
        <progress max={100} value={job.progress} aria-label="Training progress">
          {job.progress}%
        </progress>
        <span aria-live="polite">
          {job.progress}% {job.stage ? `· ${job.stage}` : ""}
        </span>
        {!isFinal(job) && (
          <button type="button" className="danger" onClick={() => void cancel()}>
            Cancel training
          </button>
        )}
        {job.status === "completed" && <a href={`#/projects/${job.project_id}/models`}>See the model</a>}
      </div>
      {job.message && <p className={job.status === "failed" ? "error" : undefined}>{job.message}</p>}
      {error && <p role="alert" className="error">{error}</p>}
      <pre className="log" aria-label="Training log" tabIndex={0}>
        {log.join("\n") || "(the log appears here while the job runs)"}
      </pre>
      <small>{authHeaders().Authorization ? "Progress is polled (a token is set)." : ""}</small>
    </section>
  );
}
