// Dataset: the project's images as a labelled thumbnail grid, drag-and-drop upload of normal and
// anomalous images (with a mask for a single anomalous image), the count towards what training
// needs, capture of a frame from a running pipeline, and the dataset's snapshots.
import { useState } from "react";
import { api, download, mediaUrl, must, uploadMedia } from "../api/client";
import { useResource, useSnapshots } from "../api/use";

type Label = "normal" | "anomalous";

export function Dataset({ projectId }: { projectId: string }) {
  const path = { project_id: projectId };
  const media = useResource(
    async () =>
      (await must(api.GET("/api/projects/{project_id}/media", { params: { path, query: { limit: 1000 } } }))).media,
    [projectId],
  );
  const needed = useResource(async () => (await must(api.GET("/api/trainable-models"))).min_normal_images, []);
  const [label, setLabel] = useState<Label>("normal");
  const [mask, setMask] = useState<File>();
  const [over, setOver] = useState(false);
  const [status, setStatus] = useState<string>();
  const [errors, setErrors] = useState<string[]>([]);

  async function upload(files: File[]) {
    const images = files.filter((f) => /^image\//.test(f.type) || /\.(png|jpe?g)$/i.test(f.name));
    const failed: string[] = [];
    let done = 0;
    for (const file of images) {
      setStatus(`Uploading ${done + 1} of ${images.length}…`);
      try {
        await uploadMedia(projectId, file, label, images.length === 1 ? mask : undefined);
        done += 1;
      } catch (e) {
        failed.push(`${file.name}: ${e instanceof Error ? e.message : String(e)}`);
      }
    }
    setErrors(failed);
    setStatus(`Uploaded ${done} of ${images.length} images as ${label}.`);
    setMask(undefined);
    await media.reload();
  }

  async function remove(mediaId: string, name: string) {
    await must(api.DELETE("/api/projects/{project_id}/media/{media_id}", { params: { path: { ...path, media_id: mediaId } } }));
    setStatus(`Deleted ${name}.`);
    await media.reload();
  }

  const normal = media.value?.filter((m) => m.label === "normal").length ?? 0;
  const anomalous = (media.value?.length ?? 0) - normal;
  const minimum = needed.value ?? 0;

  return (
    <>
      <h1>Dataset</h1>
      <p aria-live="polite" id="dataset-count">
        {normal} normal and {anomalous} anomalous images.{" "}
        {normal >= minimum ? (
          <span className="ok">Enough normal images to train.</span>
        ) : (
          <span>
            Training needs at least {minimum} normal images: {minimum - normal} more.
          </span>
        )}
      </p>
      <section className="card" aria-labelledby="upload">
        <h2 id="upload">Upload</h2>
        <div className="row">
          <label>
            Label of the next images
            <select value={label} onChange={(e) => setLabel(e.target.value as Label)}>
              <option value="normal">normal</option>
              <option value="anomalous">anomalous</option>
            </select>
          </label>
          {label === "anomalous" && (
            <label>
              Mask (PNG, for a single anomalous image)
              <input type="file" accept="image/png" onChange={(e) => setMask(e.target.files?.[0])} />
            </label>
          )}
          <label>
            Choose images
            <input
              type="file"
              accept="image/png,image/jpeg"
              multiple
              onChange={(e) => void upload(Array.from(e.target.files ?? []))}
            />
          </label>
        </div>
        <div
          className={over ? "drop over" : "drop"}
          onDragOver={(e) => {
            e.preventDefault();
            setOver(true);
          }}
          onDragLeave={() => setOver(false)}
          onDrop={(e) => {
            e.preventDefault();
            setOver(false);
            void upload(Array.from(e.dataTransfer.files));
          }}
        >
          Drop PNG or JPEG images here to upload them as <strong>{label}</strong>.
        </div>
        <p role="status">{status}</p>
        {errors.length > 0 && (
          <ul role="alert" className="error">
            {errors.map((error) => (
              <li key={error}>{error}</li>
            ))}
          </ul>
        )}
      </section>
      <Capture projectId={projectId} onCaptured={media.reload} />
      <Snapshots projectId={projectId} />
      {media.error && <p role="alert" className="error">{media.error}</p>}
      <h2>Images</h2>
      <div className="grid">
        {media.value?.map((item) => (
          <figure key={item.id}>
            <img src={mediaUrl(projectId, item.id, "thumbnail")} alt={`${item.label} image ${item.filename}`} loading="lazy" />
            <figcaption>
              <span className={`badge ${item.label}`}>{item.label}</span>
              {item.has_mask && <span className="badge">mask</span>}
              <button
                type="button"
                className="danger"
                onClick={() => void remove(item.id, item.filename)}
                aria-label={`Delete ${item.filename}`}
              >
                ✕
              </button>
            </figcaption>
          </figure>
        ))}
      </div>
    </>
  );
}

/** Captures the current frame of one of the project's running pipelines into the dataset. */
function Capture({ projectId, onCaptured }: { projectId: string; onCaptured: () => void }) {
  const active = useResource(
    async () =>
      (await must(api.GET("/api/active-pipelines"))).active_pipelines.filter((p) => p.project_id === projectId),
    [projectId],
    5000,
  );
  const [pipeline, setPipeline] = useState("");
  const [label, setLabel] = useState<Label>("normal");
  const [status, setStatus] = useState<string>();
  const chosen = pipeline || active.value?.[0]?.pipeline_id || "";

  async function capture() {
    try {
      const media = await must(api.POST("/api/captures", { body: { pipeline_id: chosen, label } }));
      setStatus(`Captured ${media.filename} as ${media.label}.`);
      onCaptured();
    } catch (e) {
      setStatus(`Capture failed: ${e instanceof Error ? e.message : String(e)}`);
    }
  }

  return (
    <section className="card" aria-labelledby="capture">
      <h2 id="capture">Capture from a running pipeline</h2>
      {active.value?.length ? (
        <div className="row">
          <label>
            Pipeline
            <select value={chosen} onChange={(e) => setPipeline(e.target.value)}>
              {active.value.map((p) => (
                <option key={p.pipeline_id} value={p.pipeline_id}>
                  {p.name}
                </option>
              ))}
            </select>
          </label>
          <label>
            Label
            <select value={label} onChange={(e) => setLabel(e.target.value as Label)}>
              <option value="normal">normal</option>
              <option value="anomalous">anomalous</option>
            </select>
          </label>
          <button type="button" onClick={() => void capture()}>
            Capture frame
          </button>
        </div>
      ) : (
        <p>No pipeline of this project is running; start one on the Pipelines screen.</p>
      )}
      <p role="status">{status}</p>
    </section>
  );
}

/** The project's snapshots: frozen copies of its images that models stay reproducible with. */
function Snapshots({ projectId }: { projectId: string }) {
  const snapshots = useSnapshots(projectId);
  const [status, setStatus] = useState<string>();

  async function act(action: () => Promise<string>) {
    try {
      setStatus(await action());
    } catch (e) {
      setStatus(e instanceof Error ? e.message : String(e));
    }
    await snapshots.reload();
  }

  const take = () =>
    act(async () => {
      const taken = await must(
        api.POST("/api/projects/{project_id}/snapshots", { params: { path: { project_id: projectId } } }),
      );
      return `Snapshot of ${taken.count} images taken (${kilobytes(taken.added_bytes)} new).`;
    });
  const remove = (id: string) =>
    act(async () => {
      await must(api.DELETE("/api/snapshots/{snapshot_id}", { params: { path: { snapshot_id: id } } }));
      return "Snapshot deleted.";
    });

  return (
    <section className="card" aria-labelledby="snapshots">
      <h2 id="snapshots">Snapshots</h2>
      <p>
        A snapshot keeps the images as they are now, so a model trained on it can be trained again after
        images are deleted. Images shared with earlier snapshots take no extra space.
      </p>
      <button type="button" onClick={() => void take()}>
        Take snapshot
      </button>
      <p role="status">{status}</p>
      {snapshots.value && snapshots.value.length > 0 && (
        <table>
          <thead>
            <tr>
              <th scope="col">Taken</th>
              <th scope="col">Images</th>
              <th scope="col">Anomalous</th>
              <th scope="col">Size</th>
              <th scope="col">Origin</th>
              <th scope="col">Actions</th>
            </tr>
          </thead>
          <tbody>
            {snapshots.value.map((s) => (
              <tr key={s.id}>
                <td>{new Date(s.created_at).toLocaleString()}</td>
                <td>{s.count}</td>
                <td>{s.anomalous}</td>
                <td>{kilobytes(s.size_bytes)}</td>
                <td>{s.origin.replace("_", " ")}</td>
                <td>
                  <button
                    type="button"
                    className="secondary"
                    aria-label={`Download the snapshot of ${new Date(s.created_at).toLocaleString()}`}
                    onClick={() =>
                      void act(async () => {
                        await download(`/api/snapshots/${s.id}/download`, "GET", s.filename);
                        return `Downloaded ${s.filename}.`;
                      })
                    }
                  >
                    Download
                  </button>
                  <button
                    type="button"
                    className="danger"
                    aria-label={`Delete the snapshot of ${new Date(s.created_at).toLocaleString()}`}
                    onClick={() => void remove(s.id)}
                  >
                    Delete
                  </button>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}

function kilobytes(bytes: number) {
  return `${(bytes / 1024).toFixed(0)} KB`;
}
