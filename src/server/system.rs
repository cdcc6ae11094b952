//! The routes about the server itself: `/health`, `/api/devices` (inference devices and
//! cameras) and `/api/openapi.json` (the description of every route).

use serde::{Deserialize, Serialize};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::http::{ApiError, ok};
use super::openapi::{Content, RouteDoc, schema_of};
use inspectflow_operators::infer::runtime::DeviceInfo;

/// The answer of `/health`.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Health {
    /// Always `ok` while the server answers.
    pub status: String,
}

/// A camera device on this machine.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CameraDevice {
    /// The N of `/dev/videoN`.
    pub index: u32,
    /// Its path, as `source.usb_camera` takes it.
    pub path: String,
    /// Always `usb_camera`.
    #[serde(rename = "type")]
    pub camera_type: String,
    /// Its name as the driver gives it (empty when unknown).
    pub name: String,
    /// What it can deliver: pixel format, size and frame rates (empty when unknown).
    pub modes: Vec<CameraMode>,
}

#[cfg(feature = "gstreamer")]
use inspectflow_operators::video::devices::CameraMode;

/// One way a camera can deliver frames (this build has no GStreamer to ask).
#[cfg(not(feature = "gstreamer"))]
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CameraMode {
    /// The pixel format.
    pub format: String,
}

/// The answer of `/api/devices`.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Devices {
    /// OpenVINO's devices, plus `AUTO`.
    pub inference_devices: Vec<DeviceInfo>,
    /// V4L2 cameras.
    pub cameras: Vec<CameraDevice>,
}

/// The routes.
pub fn routes() -> BoxedFilter<(Response,)> {
    let health = warp::path!("health").and(warp::get()).map(|| {
        ok(&Health {
            status: "ok".into(),
        })
    });
    let openapi = warp::path!("api" / "openapi.json")
        .and(warp::get())
        .map(|| ok(&super::openapi::spec()));
    let devices = warp::path!("api" / "devices")
        .and(warp::get())
        .and_then(list_devices);
    health.or(openapi).unify().or(devices).unify().boxed()
}

/// The routes' documentation.
pub const DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/health",
        summary: "Liveness: {\"status\": \"ok\"}.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<Health>)),
        errors: &[401],
    },
    RouteDoc {
        method: "get",
        path: "/api/openapi.json",
        summary: "This description.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<serde_json::Value>)),
        errors: &[401],
    },
    RouteDoc {
        method: "get",
        path: "/api/devices",
        summary: "Inference devices (OpenVINO's, plus AUTO) and cameras of this machine.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<Devices>)),
        errors: &[401, 503],
    },
];

async fn list_devices() -> Result<Response, Rejection> {
    let inference =
        tokio::task::spawn_blocking(inspectflow_operators::infer::runtime::available_devices)
            .await
            .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| ApiError::reject(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let cameras = tokio::task::spawn_blocking(cameras)
        .await
        .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(ok(&Devices {
        inference_devices: inference,
        cameras,
    }))
}

/// The `/dev/videoN` devices, named by the kernel (`/sys/class/video4linux`) and described by
/// GStreamer's device monitor where it knows them.
fn cameras() -> Vec<CameraDevice> {
    let Ok(entries) = std::fs::read_dir("/dev") else {
        return Vec::new();
    };
    let mut cameras: Vec<CameraDevice> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let file = entry.file_name().to_string_lossy().into_owned();
            let index: u32 = file.strip_prefix("video")?.parse().ok()?;
            let name = std::fs::read_to_string(format!("/sys/class/video4linux/{file}/name"))
                .map(|n| n.trim().to_string())
                .unwrap_or_default();
            Some(CameraDevice {
                index,
                path: format!("/dev/{file}"),
                camera_type: "usb_camera".into(),
                name,
                modes: Vec::new(),
            })
        })
        .collect();
    cameras.sort_by_key(|camera| camera.index);
    #[cfg(feature = "gstreamer")]
    if !cameras.is_empty() {
        for described in inspectflow_operators::video::devices::describe_cameras() {
            if let Some(camera) = cameras.iter_mut().find(|c| c.path == described.path) {
                if camera.name.is_empty() {
                    camera.name = described.name;
                }
                camera.modes = described.modes;
            }
        }
    }
    cameras
}

/// Answers 422 naming `field` unless OpenVINO has `device` on this machine (the check that
/// `/api/devices` lists; a missing runtime is a 503).
pub(crate) async fn require_device(field: &str, device: &str) -> Result<(), Rejection> {
    use inspectflow_operators::infer::model::{ModelError, require_device};
    let name = device.to_string();
    match tokio::task::spawn_blocking(move || require_device(&name))
        .await
        .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    {
        Ok(()) => Ok(()),
        Err(error @ ModelError::UnknownDevice { .. }) => Err(ApiError::reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{field}: {error}"),
        )),
        Err(error) => Err(ApiError::reject(
            StatusCode::SERVICE_UNAVAILABLE,
            error.to_string(),
        )),
    }
}
