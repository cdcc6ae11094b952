//! Media: a project's images, uploaded with a label (normal or anomalous) and an optional mask.
//!
//! `POST /api/projects/{project_id}/media` takes `multipart/form-data` with the fields `file` (PNG
//! or JPEG), `label` (`normal` or `anomalous`) and optionally `mask` (PNG, the image's size). Only
//! images that decode are accepted. The image, its 256-pixel JPEG thumbnail and the mask are
//! written under `projects/{project_id}/media/` through hidden temporary names and renamed into
//! place in the transaction that commits the record (and checks the project), so a crash never
//! leaves a record without its files and an upload racing a project's deletion leaves nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::openapi::{Content, RouteDoc, schema_of};
use bytes::BufMut;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::download::file_download;
use super::http::{ApiError, Page, blocking, listing, now, ok, paginate};
use super::projects::Project;
use super::state::AppState;
use super::store::{MEDIA, PROJECTS};
use inspectflow_operators::files::StagedFile;

/// Largest upload (image plus mask) accepted.
pub const MAX_UPLOAD_BYTES: u64 = 32 << 20;
/// Longest side of a thumbnail, in pixels.
const THUMBNAIL_SIZE: u32 = 256;

/// One uploaded image.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Media {
    /// UUID.
    pub id: String,
    /// The project it belongs to.
    pub project_id: String,
    /// The name it was uploaded with.
    pub filename: String,
    /// `normal` or `anomalous`.
    pub label: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `png` or `jpeg`.
    pub format: String,
    /// Size of the image file in bytes.
    pub size_bytes: u64,
    /// Whether a mask was uploaded with it.
    pub has_mask: bool,
    /// SHA-256 of the image file, hex: its key in dataset snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Upload time, RFC 3339 UTC.
    pub created_at: String,
    /// Where it came from when it was captured from a running pipeline (`/api/captures`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<super::captures::CaptureOrigin>,
}

impl Media {
    /// The folder of a project's media files.
    pub fn folder(data_dir: &Path, project_id: &str) -> PathBuf {
        data_dir.join("projects").join(project_id).join("media")
    }

    fn extension(&self) -> &'static str {
        if self.format == "png" { "png" } else { "jpg" }
    }

    /// The image file.
    pub fn image_path(&self, data_dir: &Path) -> PathBuf {
        Self::folder(data_dir, &self.project_id).join(format!("{}.{}", self.id, self.extension()))
    }

    /// The thumbnail file.
    pub fn thumbnail_path(&self, data_dir: &Path) -> PathBuf {
        Self::folder(data_dir, &self.project_id).join(format!("{}.thumbnail.jpg", self.id))
    }

    /// The mask file.
    pub fn mask_path(&self, data_dir: &Path) -> PathBuf {
        Self::folder(data_dir, &self.project_id).join(format!("{}.mask.png", self.id))
    }
}

listing!(
    /// The answer of `GET /api/projects/{id}/media`.
    MediaList,
    media,
    Media
);

/// The media routes.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let upload = warp::path!("api" / "projects" / String / "media")
        .and(warp::post())
        .and(multipart_content_type())
        .and(upload_form())
        .and(with_state.clone())
        .and_then(upload);
    let list = warp::path!("api" / "projects" / String / "media")
        .and(warp::get())
        .and(super::http::query::<Page>())
        .and(with_state.clone())
        .and_then(list);
    let get = warp::path!("api" / "projects" / String / "media" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and_then(get);
    let file = warp::path!("api" / "projects" / String / "media" / String / String)
        .and(warp::get())
        .and(with_state.clone())
        .and_then(file);
    let delete = warp::path!("api" / "projects" / String / "media" / String)
        .and(warp::delete())
        .and(with_state)
        .and_then(delete);
    upload
        .or(list)
        .unify()
        .or(get)
        .unify()
        .or(file)
        .unify()
        .or(delete)
        .unify()
        .boxed()
}

/// The routes' documentation.
pub const DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "post",
        path: "/api/projects/{project_id}/media",
        summary: "Upload an image: multipart fields file (PNG or JPEG), label (normal or anomalous, default normal), mask (optional PNG of the same size).",
        body: Content::MediaUpload,
        ok: (201, Content::Json(schema_of::<Media>)),
        errors: &[400, 401, 404, 413, 415, 422],
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media",
        summary: "A project's media in upload order, paginated with limit and offset.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<MediaList>)),
        errors: &[401, 404, 422],
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media/{media_id}",
        summary: "One media record.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<Media>)),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "delete",
        path: "/api/projects/{project_id}/media/{media_id}",
        summary: "Delete an image, its thumbnail and its mask.",
        body: Content::None,
        ok: (204, Content::None),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media/{media_id}/full",
        summary: "Download the image as uploaded.",
        body: Content::None,
        ok: (200, Content::Binary(&["image/png", "image/jpeg"])),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media/{media_id}/thumbnail",
        summary: "A JPEG thumbnail, 256 pixels on the longer side.",
        body: Content::None,
        ok: (200, Content::Binary(&["image/jpeg"])),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media/{media_id}/mask",
        summary: "The mask, when one was uploaded.",
        body: Content::None,
        ok: (200, Content::Binary(&["image/png"])),
        errors: &[401, 404],
    },
];

/// Passes `multipart/form-data` requests; refuses others with 415 (rather than letting warp's
/// rejection ranking answer 405).
pub(crate) fn multipart_content_type() -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("content-type")
        .and_then(|content_type: Option<String>| async move {
            match content_type {
                Some(value) if value.starts_with("multipart/form-data") => Ok(()),
                _ => Err(ApiError::reject(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "upload as multipart/form-data with the fields file, label and mask",
                )),
            }
        })
        .untuple_one()
}

/// A multipart upload of at most [`MAX_UPLOAD_BYTES`] (a larger declared length gets 413
/// naming that limit).
pub(crate) fn upload_form()
-> impl Filter<Extract = (warp::multipart::FormData,), Error = Rejection> + Clone {
    super::http::body_limit(MAX_UPLOAD_BYTES, "an upload")
        .and(warp::multipart::form().max_length(MAX_UPLOAD_BYTES))
}

pub(crate) async fn project_exists(
    state: &Arc<AppState>,
    project_id: &str,
) -> Result<(), Rejection> {
    let key = project_id.to_string();
    match blocking(state, move |store| store.get::<Project>(PROJECTS, &key)).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::not_found("project", project_id)),
    }
}

async fn media_of(
    state: &Arc<AppState>,
    project_id: &str,
    media_id: &str,
) -> Result<Media, Rejection> {
    let key = media_id.to_string();
    match blocking(state, move |store| store.get::<Media>(MEDIA, &key)).await? {
        Some(media) if media.project_id == project_id => Ok(media),
        _ => Err(ApiError::not_found("media", media_id)),
    }
}

/// The parts of an upload form.
#[derive(Default)]
pub(crate) struct UploadForm {
    pub(crate) file: Option<(String, Vec<u8>)>,
    label: Option<String>,
    mask: Option<Vec<u8>>,
}

pub(crate) async fn read_form(form: warp::multipart::FormData) -> Result<UploadForm, Rejection> {
    let parts: Vec<(String, Option<String>, Vec<u8>)> = form
        .and_then(|part| async move {
            let name = part.name().to_string();
            let filename = part.filename().map(str::to_string);
            let bytes = part
                .stream()
                .try_fold(Vec::new(), |mut bytes, chunk| async move {
                    bytes.put(chunk);
                    Ok(bytes)
                })
                .await?;
            Ok((name, filename, bytes))
        })
        .try_collect()
        .await
        .map_err(|e| {
            let text = e.to_string();
            if text.contains("limit") || text.contains("too large") {
                ApiError::reject(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("upload larger than {MAX_UPLOAD_BYTES} bytes"),
                )
            } else {
                ApiError::reject(StatusCode::BAD_REQUEST, format!("multipart form: {text}"))
            }
        })?;
    let mut form = UploadForm::default();
    for (name, filename, bytes) in parts {
        let given_before = match name.as_str() {
            "file" => form.file.is_some(),
            "label" => form.label.is_some(),
            "mask" => form.mask.is_some(),
            _ => false,
        };
        if given_before {
            return Err(ApiError::reject(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{name}: given twice (one image per upload)"),
            ));
        }
        match name.as_str() {
            "file" => form.file = Some((filename.unwrap_or_else(|| "image".into()), bytes)),
            "label" => form.label = Some(String::from_utf8_lossy(&bytes).trim().to_string()),
            "mask" => form.mask = Some(bytes),
            other => {
                return Err(ApiError::reject(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("{other}: unknown form field (expected file, label, mask)"),
                ));
            }
        }
    }
    Ok(form)
}

async fn upload(
    project_id: String,
    form: warp::multipart::FormData,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    // The body is read before the project is looked up: answering 404 with a body still
    // unread makes the server close the connection under a client that is still sending, which
    // then sees a broken connection instead of the answer.
    let form = read_form(form).await?;
    project_exists(&state, &project_id).await?;
    let unprocessable = |detail: &str| ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, detail);
    let Some((filename, bytes)) = form.file else {
        return Err(unprocessable("file: missing (a PNG or JPEG image)"));
    };
    let label = match form.label.as_deref() {
        Some("normal") | None => "normal",
        Some("anomalous") => "anomalous",
        Some(other) => {
            return Err(unprocessable(&format!(
                "label: '{other}' is neither normal nor anomalous"
            )));
        }
    };
    let format = match image::guess_format(&bytes) {
        Ok(image::ImageFormat::Png) => "png",
        Ok(image::ImageFormat::Jpeg) => "jpeg",
        _ => {
            return Err(ApiError::reject(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("file: {filename} is not a PNG or JPEG image"),
            ));
        }
    };
    if form.mask.is_some() && label != "anomalous" {
        return Err(unprocessable(
            "mask: only anomalous images have masks (label is normal)",
        ));
    }
    // The mask is stored as `<id>.mask.png` and read back as PNG: another format is refused
    // rather than stored under the wrong name (JPEG would also blur its edges).
    if let Some(mask) = &form.mask
        && image::guess_format(mask).ok() != Some(image::ImageFormat::Png)
    {
        return Err(ApiError::reject(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "mask: not a PNG image (a mask is a PNG of the image's size)",
        ));
    }
    // Decoding takes a core and up to MAX_DECODED_BYTES: off the async threads, a few at once.
    let permit = state
        .image_decodes
        .acquire()
        .await
        .map_err(|e| ApiError::reject(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let mask = form.mask;
    let name = filename.clone();
    let (bytes, mask, decoded) = tokio::task::spawn_blocking(move || {
        let decoded = decode_upload(&bytes).map_err(|e| {
            ApiError::reject(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("file: {name} does not decode: {e}"),
            )
        })?;
        if let Some(mask) = &mask {
            let (width, height) = decode_upload(mask)
                .map(|mask| (mask.width(), mask.height()))
                .map_err(|e| {
                    ApiError::reject(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        format!("mask: does not decode: {e}"),
                    )
                })?;
            if (width, height) != (decoded.width(), decoded.height()) {
                return Err(unprocessable(&format!(
                    "mask: {width}x{height} does not match the image's {}x{}",
                    decoded.width(),
                    decoded.height()
                )));
            }
        }
        Ok((bytes, mask, decoded))
    })
    .await
    .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    drop(permit);
    let media = Media {
        id: uuid::Uuid::new_v4().to_string(),
        project_id,
        filename: filename
            .chars()
            .filter(|c| !c.is_control())
            .take(255)
            .collect(),
        label: label.to_string(),
        width: decoded.width(),
        height: decoded.height(),
        format: format.to_string(),
        size_bytes: bytes.len() as u64,
        has_mask: mask.is_some(),
        sha256: None,
        created_at: now(),
        capture: None,
    };
    let media = save(&state, media, bytes, decoded, mask).await?;
    Ok(warp::reply::with_status(warp::reply::json(&media), StatusCode::CREATED).into_response())
}

/// The most memory one uploaded image (or its mask) may decode to: 256 MiB, 89 megapixels of
/// RGB. A small file can claim a huge image; this refuses it before the pixels are allocated.
pub(crate) const MAX_DECODED_BYTES: u64 = 256 << 20;

/// An image's width and height from its header (none when it does not decode or is empty).
pub(crate) fn header_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()
        .and_then(|reader| reader.into_dimensions().ok())
        .filter(|&(width, height)| width > 0 && height > 0)
}

/// Decodes an uploaded PNG or JPEG within [`MAX_DECODED_BYTES`].
fn decode_upload(bytes: &[u8]) -> image::ImageResult<image::DynamicImage> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    reader.decode()
}

/// Saves a new item: its image, thumbnail (made from `decoded`) and mask are written under
/// hidden temporary names first; then one store transaction checks that the project still
/// exists, renames them into place and commits the record. A crash never leaves a record without
/// its files, and an upload racing the project's deletion answers 404 and leaves nothing behind.
pub(crate) async fn save(
    state: &Arc<AppState>,
    mut media: Media,
    bytes: Vec<u8>,
    decoded: image::DynamicImage,
    mask: Option<Vec<u8>>,
) -> Result<Media, Rejection> {
    media.sha256 = Some(super::blobs::sha256_hex(&bytes));
    let record = media.clone();
    let data_dir = state.data_dir.clone();
    let saved = blocking(state, move |store| {
        let io = |e: std::io::Error| super::store::StoreError::Database(e.to_string());
        let mut thumbnail = Vec::new();
        decoded
            .thumbnail(THUMBNAIL_SIZE, THUMBNAIL_SIZE)
            .to_rgb8()
            .write_to(
                &mut std::io::Cursor::new(&mut thumbnail),
                image::ImageFormat::Jpeg,
            )
            .map_err(|e| super::store::StoreError::Database(format!("thumbnail: {e}")))?;
        drop(decoded);
        let mut files = vec![
            (record.image_path(&data_dir), bytes),
            (record.thumbnail_path(&data_dir), thumbnail),
        ];
        if let Some(mask) = mask {
            files.push((record.mask_path(&data_dir), mask));
        }
        let staged: std::io::Result<Vec<StagedFile>> =
            std::fs::create_dir_all(Media::folder(&data_dir, &record.project_id)).and_then(|()| {
                files
                    .iter()
                    .map(|(path, bytes)| StagedFile::write(path, bytes))
                    .collect()
            });
        let placed: Vec<PathBuf> = files.iter().map(|(path, _)| path.clone()).collect();
        let committed = match staged {
            // The folder may have gone with its project: the transaction tells.
            Err(error) => store.write(|tx| {
                if tx.contains(PROJECTS, &record.project_id)? {
                    return Err(io(error));
                }
                Ok(false)
            }),
            Ok(staged) => store.write(|tx| {
                if !tx.contains(PROJECTS, &record.project_id)? {
                    return Ok(false);
                }
                for file in staged {
                    file.place().map_err(io)?;
                }
                tx.put(MEDIA, &record.id, &record)?;
                Ok(true)
            }),
        };
        if !matches!(committed, Ok(true)) {
            // Rolled back: nothing of this upload stays (files already renamed included).
            for path in &placed {
                let _ = std::fs::remove_file(path);
            }
        }
        if matches!(committed, Ok(false)) {
            // The project is gone for good (ids are never reused): so is its folder, which
            // this upload may have made again.
            let _ = std::fs::remove_dir_all(data_dir.join("projects").join(&record.project_id));
        }
        committed
    })
    .await?;
    if saved {
        Ok(media)
    } else {
        Err(ApiError::not_found("project", &media.project_id))
    }
}

async fn list(project_id: String, page: Page, state: Arc<AppState>) -> Result<Response, Rejection> {
    project_exists(&state, &project_id).await?;
    let mut media: Vec<Media> = blocking(&state, |store| store.all(MEDIA)).await?;
    media.retain(|m| m.project_id == project_id);
    media.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    let (items, pagination) = paginate(media, &page)?;
    Ok(ok(&MediaList {
        media: items,
        pagination,
    }))
}

async fn get(
    project_id: String,
    media_id: String,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let media = media_of(&state, &project_id, &media_id).await?;
    Ok(warp::reply::json(&media).into_response())
}

/// `.../media/{id}/full`, `.../thumbnail` and `.../mask`: the files themselves.
async fn file(
    project_id: String,
    media_id: String,
    which: String,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let media = media_of(&state, &project_id, &media_id).await?;
    let (path, content_type) = match which.as_str() {
        "full" if media.format == "png" => (media.image_path(&state.data_dir), "image/png"),
        "full" => (media.image_path(&state.data_dir), "image/jpeg"),
        "thumbnail" => (media.thumbnail_path(&state.data_dir), "image/jpeg"),
        "mask" if media.has_mask => (media.mask_path(&state.data_dir), "image/png"),
        "mask" => return Err(ApiError::not_found("mask of media", &media_id)),
        _ => return Err(warp::reject::not_found()),
    };
    file_download(&path, content_type)
        .await
        .map_err(|e| match e.kind() {
            // Deleted since its record was read (the record goes first, then the files).
            std::io::ErrorKind::NotFound => ApiError::not_found("media", &media_id),
            _ => ApiError::reject(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("media {media_id}: its file is unreadable: {e}"),
            ),
        })
}

async fn delete(
    project_id: String,
    media_id: String,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let media = media_of(&state, &project_id, &media_id).await?;
    let data_dir = state.data_dir.clone();
    blocking(&state, move |store| {
        // The record goes first: a crash in between leaves orphan files (check-db lists them),
        // never a record without its file.
        store.remove(MEDIA, &media.id)?;
        for path in [
            media.image_path(&data_dir),
            media.thumbnail_path(&data_dir),
            media.mask_path(&data_dir),
        ] {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
