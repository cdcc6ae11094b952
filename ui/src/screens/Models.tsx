// Models: each model's validation metrics and calibration, a threshold slider that shows which
// of the project's images it would flag before it is saved, predict on an uploaded image with
// its heatmap, and export.
import { useEffect, useState } from "react";
import { ApiProblem, api, authHeaders, download, mediaUrl, must, type Media, type Model, type Schemas } from "../api/client";
import { useResource } from "../api/use";

export function Models({ projectId }: { projectId: string }) {
  const models = useResource(
    async () =>
      (await must(api.GET("/api/projects/{project_id}/models", { params: { path: { project_id: projectId } } }))).models,
    [projectId],
  );
  return (
    <>
      <h1>Models</h1>
      {models.error && <p role="alert" className="error">{models.error}</p>}
      {models.value?.length === 0 && (
        <p>
          No model yet: <a href={`#/projects/${projectId}/training`}>train one</a>.
        </p>
      )}
      {models.value?.map((model) => <ModelCard key={model.id} model={model} onChange={models.reload} />)}
    </>
  );
}

type Metrics = {
  validation?: Record<string, number | string>;
  calibration?: { expected_false_positive_rate?: number; image_method?: string };
};

function ModelCard({ model, onChange }: { model: Model; onChange: () => void }) {
  const metrics = (model.metrics ?? {}) as Metrics;
  const validation = metrics.validation ?? {};
  const path = { project_id: model.project_id, model_id: model.id };
  return (
    <section className="card" aria-labelledby={`model-${model.id}`}>
      <h2 id={`model-${model.id}`}>
        {model.name} <span className="badge">{model.architecture}</span> <span className="badge">{model.backbone}</span>
      </h2>
      <table>
        <caption>Validation</caption>
        <tbody>
          <tr>
            <th scope="row">Image AUROC</th>
            <td>{fmt(validation.image_auroc)}</td>
            <th scope="row">Image F1</th>
            <td>{fmt(validation.image_f1)}</td>
            <th scope="row">Pixel AUROC</th>
            <td>{fmt(validation.pixel_auroc)}</td>
          </tr>
          <tr>
            <th scope="row">Expected false-positive rate</th>
            <td>
              {metrics.calibration?.expected_false_positive_rate !== undefined
                ? `${(metrics.calibration.expected_false_positive_rate * 100).toFixed(2)}%`
                : "–"}
            </td>
            <th scope="row">Calibrated threshold</th>
            <td>{model.calibrated_threshold.toFixed(3)}</td>
            <th scope="row">Input</th>
            <td>
              {model.input_size}×{model.input_size}, {(model.size_bytes / 1e6).toFixed(1)} MB
            </td>
          </tr>
        </tbody>
      </table>
      <Threshold model={model} onSaved={onChange} />
      <Predict model={model} />
      <div className="row">
        <button type="button" className="secondary" onClick={() => void exportModel(model, "openvino")}>
          Export OpenVINO (zip)
        </button>
        <button type="button" className="secondary" onClick={() => void exportModel(model, "onnx")}>
          Export ONNX (zip)
        </button>
        <button
          type="button"
          className="danger"
          onClick={async () => {
            if (!confirm(`Delete model ${model.name}?`)) return;
            await must(api.DELETE("/api/projects/{project_id}/models/{model_id}", { params: { path } }));
            onChange();
          }}
        >
          Delete model
        </button>
      </div>
    </section>
  );
}

function fmt(value: unknown) {
  return typeof value === "number" ? value.toFixed(3) : "–";
}

async function exportModel(model: Model, format: "openvino" | "onnx") {
  await download(
    `/api/projects/${model.project_id}/models/${model.id}:export?format=${format}`,
    "POST",
    `${model.name}-${format}.zip`,
  );
}

/** Scores one image with the model (the server's `:predict`). */
async function predict(model: Model, image: Blob, name: string): Promise<Schemas["PredictAnswer"]> {
  const form = new FormData();
  form.append("file", image, name);
  const response = await fetch(`/api/projects/${model.project_id}/models/${model.id}:predict`, {
    method: "POST",
    body: form,
    headers: authHeaders(),
  });
  const body = await response.json();
  if (!response.ok) throw new ApiProblem(response.status, body.detail ?? response.statusText);
  return body;
}

/** How many of the project's images are scored for the slider's preview. */
const PREVIEW_IMAGES = 12;

function Threshold({ model, onSaved }: { model: Model; onSaved: () => void }) {
  const [threshold, setThreshold] = useState(model.threshold);
  const [scored, setScored] = useState<{ media: Media; score: number }[]>([]);
  const [status, setStatus] = useState<string>();
  useEffect(() => {
    let cancelled = false;
    (async () => {
      const media = (
        await must(
          api.GET("/api/projects/{project_id}/media", {
            params: { path: { project_id: model.project_id }, query: { limit: 1000 } },
          }),
        )
      ).media;
      // Both labels, so the preview shows what a threshold misses and what it flags.
      const sample = [
        ...media.filter((m) => m.label === "anomalous").slice(0, PREVIEW_IMAGES / 2),
        ...media.filter((m) => m.label === "normal"),
      ].slice(0, PREVIEW_IMAGES);
      const results: { media: Media; score: number }[] = [];
      for (const item of sample) {
        const image = await (await fetch(mediaUrl(model.project_id, item.id, "full"), { headers: authHeaders() })).blob();
        const answer = await predict(model, image, item.filename);
        results.push({ media: item, score: answer.score });
        if (!cancelled) setScored([...results]);
      }
    })().catch((e) => setStatus(e instanceof Error ? e.message : String(e)));
    return () => {
      cancelled = true;
    };
    // Scored once per model: saving a threshold reloads the model record, not its scores.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [model.id, model.project_id]);

  async function save() {
    try {
      await must(
        api.PATCH("/api/projects/{project_id}/models/{model_id}", {
          params: { path: { project_id: model.project_id, model_id: model.id } },
          body: { threshold },
        }),
      );
      setStatus(`Threshold ${threshold.toFixed(3)} saved.`);
      onSaved();
    } catch (e) {
      setStatus(e instanceof Error ? e.message : String(e));
    }
  }

  const flagged = scored.filter((s) => s.score >= threshold);
  const wrong = scored.filter((s) => (s.score >= threshold) !== (s.media.label === "anomalous")).length;
  return (
    <div>
      <h3>Decision threshold</h3>
      <div className="row">
        <label>
          Threshold (0 to 1; calibrated {model.calibrated_threshold.toFixed(3)})
          <input
            type="range"
            min={0}
            max={1}
            step={0.005}
            value={threshold}
            onChange={(e) => setThreshold(Number(e.target.value))}
          />
        </label>
        <output aria-live="polite" id={`threshold-${model.id}`}>
          {threshold.toFixed(3)}: flags {flagged.length} of {scored.length} images, {wrong} disagree with their label
        </output>
        <button type="button" onClick={() => void save()} disabled={threshold === model.threshold}>
          Save threshold
        </button>
      </div>
      <p role="status">{status}</p>
      <div className="thresholds">
        {scored.map(({ media, score }) => (
          <figure key={media.id} className={score >= threshold ? "flagged" : undefined}>
            <img src={mediaUrl(model.project_id, media.id, "thumbnail")} alt={`${media.label} image ${media.filename}`} />
            <figcaption>
              {media.label}, score {score.toFixed(3)}: {score >= threshold ? "flagged" : "passes"}
            </figcaption>
          </figure>
        ))}
      </div>
    </div>
  );
}

function Predict({ model }: { model: Model }) {
  const [answer, setAnswer] = useState<Schemas["PredictAnswer"]>();
  const [error, setError] = useState<string>();
  return (
    <div>
      <h3>Try an image</h3>
      <label>
        Image to score with {model.name}
        <input
          type="file"
          accept="image/png,image/jpeg"
          onChange={async (e) => {
            const file = e.target.files?.[0];
            if (!file) return;
            try {
              setAnswer(await predict(model, file, file.name));
              setError(undefined);
            } catch (problem) {
              setError(problem instanceof Error ? problem.message : String(problem));
            }
          }}
        />
      </label>
      {error && <p role="alert" className="error">{error}</p>}
      {answer && (
        <figure>
          <img
            src={`data:image/jpeg;base64,${answer.image_with_predictions}`}
            alt={`heatmap of the scored image: ${answer.label}, score ${answer.score.toFixed(3)}`}
            style={{ maxWidth: "24rem" }}
          />
          <figcaption>
            {answer.label}: score {answer.score.toFixed(3)} against threshold {answer.threshold.toFixed(3)}
          </figcaption>
        </figure>
      )}
    </div>
  );
}
