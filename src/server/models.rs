//! Trained models: records of the packages under `models/<id>/` that training jobs register.
//!
//! - `GET /api/projects/{project_id}/models` and `.../models/{model_id}`: list and get;
//! - `PATCH .../models/{model_id}`: rename, or move the decision threshold (0-1) that `:predict`
//!   and pipelines built from the model use (the package keeps its calibrated one);
//! - `DELETE .../models/{model_id}`: refused (409) while a running pipeline uses it;
//! - `POST .../models/{model_id}:predict`: score an uploaded image (score, label, threshold, the
//!   anomaly map as a PNG and the overlay as a JPEG, base64);
//! - `POST .../models/{model_id}:export`: the package as a zip.
//!
//! Compiled models are kept per model for `:predict` and dropped when the model changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::download::streamed_file_reply;
use super::openapi::{Content, RouteDoc, schema_of};
use base64::Engine;
use serde::{Deserialize, Serialize};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::http::{ApiError, Page, action, blocking, json_body, listing, now, paginate};
use super::jobs::Job;
use super::state::AppState;
use super::store::MODELS;
use crate::operators::package::ModelPackage;
use crate::predictor::Predictor;

/// A registered model.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Model {
    /// UUID (also its package folder's name).
    pub id: String,
    /// The project it was trained for.
    pub project_id: String,
    /// Display name.
    pub name: String,
    /// Always `openvino` (IR).
    pub format: String,
    /// Model family.
    pub architecture: String,
    /// Backbone.
    pub backbone: String,
    /// Square input size.
    pub input_size: usize,
    /// Decision threshold on normalised scores (0-1) used by `:predict` and pipelines.
    pub threshold: f32,
    /// The threshold training calibrated.
    pub calibrated_threshold: f32,
    /// Validation metrics from training.
    pub metrics: serde_json::Value,
    /// The job that trained it.
    pub train_job_id: String,
    /// The dataset snapshot it was trained on (`/api/snapshots/{id}`).
    #[serde(default)]
    pub dataset_snapshot_id: Option<String>,
    /// Size of the package in bytes.
    pub size_bytes: u64,
    /// Registration time.
    pub created_at: String,
}

impl Model {
    /// The package folder of model `id`.
    pub fn dir(data_dir: &Path, id: &str) -> PathBuf {
        data_dir.join("models").join(id)
    }

    /// The record of the package just trained in `dir` by `job`.
    pub fn from_package(
        dir: &Path,
        job: &Job,
        dataset_snapshot_id: Option<String>,
    ) -> Result<Self, String> {
        let package = ModelPackage::open(dir).map_err(|e| e.to_string())?;
        let manifest = &package.manifest;
        let size_bytes = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
            .filter_map(|entry| entry.ok()?.metadata().ok())
            .map(|metadata| metadata.len())
            .sum();
        Ok(Self {
            id: job.model_id.clone(),
            project_id: job.project_id.clone(),
            name: job.payload.name.clone().unwrap_or_else(|| {
                format!(
                    "{} {}",
                    manifest.architecture,
                    job.created_at.replace('T', " ")
                )
            }),
            format: "openvino".into(),
            architecture: manifest.architecture.clone(),
            backbone: manifest.backbone.clone(),
            input_size: manifest.input_size,
            threshold: manifest.threshold,
            calibrated_threshold: manifest.threshold,
            metrics: manifest.metrics.clone(),
            train_job_id: job.id.clone(),
            dataset_snapshot_id,
            size_bytes,
            created_at: now(),
        })
    }
}

/// Compiled models for `:predict`, by model id.
#[derive(Default)]
pub struct LoadedModels {
    loaded: Mutex<HashMap<String, Arc<Mutex<Predictor>>>>,
}

impl LoadedModels {
    fn forget(&self, id: &str) {
        if let Ok(mut loaded) = self.loaded.lock() {
            loaded.remove(id);
        }
    }
}

/// Body of `PATCH .../models/{model_id}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModelChange {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    threshold: Option<f32>,
}

listing!(
    /// The answer of `GET /api/projects/{id}/models`.
    ModelList,
    models,
    Model
);

/// The model routes.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let list = warp::path!("api" / "projects" / String / "models")
        .and(warp::get())
        .and(super::http::query::<Page>())
        .and(with_state.clone())
        .and_then(list);
    let get = warp::path!("api" / "projects" / String / "models" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and_then(get);
    let change = warp::path!("api" / "projects" / String / "models" / String)
        .and(warp::patch())
        .and(json_body::<ModelChange>())
        .and(with_state.clone())
        .and_then(change);
    let delete = warp::path!("api" / "projects" / String / "models" / String)
        .and(warp::delete())
        .and(with_state.clone())
        .and_then(delete);
    let models_prefix = || {
        warp::path("api")
            .and(warp::path("projects"))
            .and(warp::path::param::<String>())
            .and(warp::path("models"))
    };
    let predict = models_prefix()
        .and(action("predict"))
        .and(warp::path::end())
        .and(warp::post())
        .and(super::media::multipart_content_type())
        .and(super::media::upload_form())
        .and(with_state.clone())
        .and_then(predict);
    let export = models_prefix()
        .and(action("export"))
        .and(warp::path::end())
        .and(warp::post())
        .and(super::http::query::<ExportQuery>())
        .and(with_state)
        .and_then(export);
    list.or(get)
        .unify()
        .or(change)
        .unify()
        .or(delete)
        .unify()
        .or(predict)
        .unify()
        .or(export)
        .unify()
        .boxed()
}

/// The routes' documentation.
pub const DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/models",
        summary: "The project's models, paginated.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<ModelList>)),
        errors: &[401, 404, 422],
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/models/{model_id}",
        summary: "A model: family, backbone, threshold, validation metrics, size.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<Model>)),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "patch",
        path: "/api/projects/{project_id}/models/{model_id}",
        summary: "Rename a model or set its decision threshold (0-1).",
        body: Content::Json(schema_of::<ModelChange>),
        ok: (200, Content::Json(schema_of::<Model>)),
        errors: &[401, 404, 413, 415, 422],
    },
    RouteDoc {
        method: "delete",
        path: "/api/projects/{project_id}/models/{model_id}",
        summary: "Delete a model and its package (409 while a running pipeline uses it).",
        body: Content::None,
        ok: (204, Content::None),
        errors: &[401, 404, 409],
    },
    RouteDoc {
        method: "post",
        path: "/api/projects/{project_id}/models/{model_id}:predict",
        summary: "Score an uploaded image: score, label, threshold, anomaly map (PNG) and overlay (JPEG), base64.",
        body: Content::ImageUpload,
        ok: (200, Content::Json(schema_of::<PredictAnswer>)),
        errors: &[401, 404, 413, 415, 422, 503],
    },
    RouteDoc {
        method: "post",
        path: "/api/projects/{project_id}/models/{model_id}:export",
        summary: "The model package as a zip: `format=openvino` (default; IR and manifest) or `format=onnx` (model.onnx, the same network and outputs, and the manifest), `precision=fp16` for half-size ONNX weights; 422 for an IR operation ONNX export does not convert.",
        body: Content::None,
        ok: (200, Content::Binary(&["application/zip"])),
        errors: &[401, 404, 422],
    },
];

/// The model `model_id` of project `project_id`, or 404.
pub async fn model_of(
    state: &Arc<AppState>,
    project_id: &str,
    model_id: &str,
) -> Result<Model, Rejection> {
    super::media::project_exists(state, project_id).await?;
    let key = model_id.to_string();
    match blocking(state, move |store| store.get::<Model>(MODELS, &key)).await? {
        Some(model) if model.project_id == project_id => Ok(model),
        _ => Err(ApiError::not_found("model", model_id)),
    }
}

async fn list(project_id: String, page: Page, state: Arc<AppState>) -> Result<Response, Rejection> {
    super::media::project_exists(&state, &project_id).await?;
    let mut models: Vec<Model> = blocking(&state, |store| store.all(MODELS)).await?;
    models.retain(|model| model.project_id == project_id);
    models.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    let (items, pagination) = paginate(models, &page)?;
    Ok(warp::reply::json(&ModelList {
        models: items,
        pagination,
    })
    .into_response())
}

async fn get(
    project_id: String,
    model_id: String,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    Ok(warp::reply::json(&model_of(&state, &project_id, &model_id).await?).into_response())
}

async fn change(
    project_id: String,
    model_id: String,
    change: ModelChange,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let mut model = model_of(&state, &project_id, &model_id).await?;
    if let Some(threshold) = change.threshold {
        if !(0.0..=1.0).contains(&threshold) || threshold.is_nan() {
            return Err(ApiError::reject(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("threshold: {threshold} is outside 0-1"),
            ));
        }
        model.threshold = threshold;
    }
    if let Some(name) = change.name {
        let name = name.trim().to_string();
        if name.is_empty() || name.len() > 200 {
            return Err(ApiError::reject(
                StatusCode::UNPROCESSABLE_ENTITY,
                "name: must be 1 to 200 characters",
            ));
        }
        model.name = name;
    }
    let stored = model.clone();
    blocking(&state, move |store| store.put(MODELS, &stored.id, &stored)).await?;
    state.models.forget(&model.id);
    Ok(warp::reply::json(&model).into_response())
}

async fn delete(
    project_id: String,
    model_id: String,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let model = model_of(&state, &project_id, &model_id).await?;
    if let Some(pipeline) = state.pipelines.using_model(&model.id) {
        return Err(ApiError::reject(
            StatusCode::CONFLICT,
            format!("model {model_id} is used by running pipeline {pipeline}; stop it first"),
        ));
    }
    let id = model.id.clone();
    blocking(&state, move |store| store.remove(MODELS, &id)).await?;
    state.models.forget(&model.id);
    // Record first, files after: a crash in between leaves an orphan folder, never a record
    // without its package.
    let _ = std::fs::remove_dir_all(Model::dir(&state.data_dir, &model.id));
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The verdict `:predict` answers.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PredictAnswer {
    model_id: String,
    score: f32,
    raw_score: f32,
    threshold: f32,
    label: &'static str,
    /// The normalised anomaly map as an 8-bit grey PNG at the image's size, base64.
    anomaly_map: String,
    /// The image with the heatmap drawn over it, JPEG, base64.
    image_with_predictions: String,
    width: u32,
    height: u32,
}

async fn predict(
    project_id: String,
    model_id: String,
    form: warp::multipart::FormData,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    // Body first, then the lookup (see `media::upload`: an early 404 over an unread body
    // reaches a client still sending as a broken connection).
    let form = super::media::read_form(form).await?;
    let model = model_of(&state, &project_id, &model_id).await?;
    let Some((filename, bytes)) = form.file else {
        return Err(ApiError::reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            "file: the form needs an image in the field 'file'",
        ));
    };
    let predictor = {
        let cached = state
            .models
            .loaded
            .lock()
            .ok()
            .and_then(|loaded| loaded.get(&model.id).cloned());
        match cached {
            Some(predictor) => predictor,
            None => {
                let dir = Model::dir(&state.data_dir, &model.id);
                let threshold = model.threshold;
                let loaded =
                    tokio::task::spawn_blocking(move || Predictor::load(&dir, Some(threshold)))
                        .await
                        .map_err(|e| {
                            ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                        })?
                        .map_err(|e| {
                            ApiError::reject(
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("model {}: cannot be loaded: {e}", model.id),
                            )
                        })?;
                let loaded = Arc::new(Mutex::new(loaded));
                if let Ok(mut all) = state.models.loaded.lock() {
                    all.insert(model.id.clone(), Arc::clone(&loaded));
                }
                loaded
            }
        }
    };
    // The image's size is checked from its header before it is decoded: a small compressed
    // file may claim gigabytes of pixels.
    if let Some((width, height)) = super::media::header_dimensions(&bytes) {
        let decoded = u64::from(width) * u64::from(height) * 3;
        if width.max(height) > JPEG_MAX_SIDE || decoded > super::media::MAX_DECODED_BYTES {
            return Err(ApiError::reject(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "file: the image is {width}x{height}; at most {JPEG_MAX_SIDE} pixels a side \
                     (the answer's overlay is a JPEG) and {} bytes of RGB pixels are scored",
                    super::media::MAX_DECODED_BYTES
                ),
            ));
        }
    }
    // Decoding and scoring take a core each: a few at once, as for uploads.
    let permit = state
        .image_decodes
        .acquire()
        .await
        .map_err(|e| ApiError::reject(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let model_id = model.id.clone();
    let answer = tokio::task::spawn_blocking(move || -> Result<PredictAnswer, Rejection> {
        let mut predictor = predictor.lock().map_err(|_| {
            ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, "model lock poisoned")
        })?;
        let frame =
            crate::operators::decode::decode_rgb(&bytes, &filename, predictor.frame_pool(), 0)
                .map_err(|e| {
                    ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, format!("file: {e}"))
                })?;
        let (width, height) = (frame.layout.width, frame.layout.height);
        let prediction = predictor.score(&frame).map_err(|e| {
            ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, format!("file: {e}"))
        })?;
        let overlay = predictor
            .overlay(&frame, &prediction)
            .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        let internal = |e: String| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e);
        let map: Vec<u8> = crate::operators::map_upsample::upsample(
            &prediction.map,
            prediction.map_width as usize,
            prediction.map_height as usize,
            width as usize,
            height as usize,
        )
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
        let base64 = base64::engine::general_purpose::STANDARD;
        Ok(PredictAnswer {
            model_id,
            score: prediction.score,
            raw_score: prediction.raw_score,
            threshold: prediction.threshold,
            label: prediction.label().as_str(),
            anomaly_map: base64.encode(encode_png_gray(&map, width, height).map_err(internal)?),
            image_with_predictions: base64.encode(encode_jpeg(&overlay).map_err(internal)?),
            width: frame.layout.width,
            height: frame.layout.height,
        })
    })
    .await
    .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    drop(permit);
    Ok(warp::reply::json(&answer).into_response())
}

/// The largest width or height a JPEG (libjpeg-turbo) encodes.
const JPEG_MAX_SIDE: u32 = 65_500;

fn encode_png_gray(pixels: &[u8], width: u32, height: u32) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(pixels, width, height, image::ExtendedColorType::L8)
        .map_err(|e| format!("anomaly map PNG: {e}"))?;
    Ok(bytes)
}

fn encode_jpeg(frame: &crate::operators::Frame) -> Result<Vec<u8>, String> {
    use crate::operators::transform::encode::{EncodeParams, EncodeSource, JpegEncoder};
    let mut encoder = JpegEncoder::new(EncodeParams {
        quality: 85,
        source: EncodeSource::Frame,
    })
    .map_err(|e| e.to_string())?;
    let encoded = encoder.encode(frame).map_err(|e| e.to_string())?;
    Ok(encoded.bytes().to_vec())
}

use image::ImageEncoder;

/// The query of `:export`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// `openvino` (default: the package's IR) or `onnx` (`model.onnx` in its place).
    #[serde(default)]
    pub format: crate::onnx::ExportFormat,
    /// `fp16` stores ONNX weights as 16-bit floats (half the size); default `fp32`.
    #[serde(default)]
    pub precision: Option<String>,
}

/// `:export`: the package as a zip, in the format asked for, written while it is sent
/// ([`streamed_file_reply`]): the server holds a few chunks of it, not the package.
async fn export(
    project_id: String,
    model_id: String,
    query: ExportQuery,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let fp16 = match query.precision.as_deref() {
        None | Some("fp32") => false,
        Some("fp16") if query.format == crate::onnx::ExportFormat::Onnx => true,
        Some("fp16") => {
            return Err(ApiError::reject(
                StatusCode::UNPROCESSABLE_ENTITY,
                "precision: fp16 is offered for format=onnx",
            ));
        }
        Some(other) => {
            return Err(ApiError::reject(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("precision: {other:?}, expected fp32 or fp16"),
            ));
        }
    };
    let model = model_of(&state, &project_id, &model_id).await?;
    let dir = Model::dir(&state.data_dir, &model.id);
    let format = query.format;
    let package = tokio::task::spawn_blocking(move || {
        crate::onnx::package_files(&dir, format, crate::onnx::OnnxOptions { fp16 }).map_err(|e| {
            match e {
                crate::onnx::ExportError::Io(message) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, message)
                }
                unconvertible => (StatusCode::UNPROCESSABLE_ENTITY, unconvertible.to_string()),
            }
        })
    })
    .await
    .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|(status, e)| ApiError::reject(status, e))?;
    let filename: String = model
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    streamed_file_reply(
        "application/zip",
        Some(&format!("{filename}.zip")),
        move |body| package.write_zip(body),
    )
    .await
}
