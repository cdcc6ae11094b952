//! `sink.folder`: writes the images a result asks for as files and one prediction message per
//! result as a line of an index file (JSON lines; the shape is `schemas/prediction-message.schema.json`,
//! with each image's `file` named relative to the folder).
//!
//! Nothing half-written is ever visible: an image is encoded to a hidden temporary file in the
//! same directory and renamed into place, and its line is appended (and flushed) only after
//! the rename, so every line names complete files. With `retention`, the oldest images (including
//! those of earlier runs, as the index names them) are deleted once the folder holds more than
//! `keep_last` images or `keep_bytes` bytes of them; the index keeps their lines as history.
//! Files the index does not name are never deleted.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::message::{Dispatch, DispatchParams, ImagePart, Images, OutputFormat};
use crate::contract::{
    EndpointHealth, OpError, OperatorInstance, OperatorKind, PortType, Sink, SinkContext,
};
use crate::packet::{Frame, Packet, PixelFormat};
use crate::pool::BufferPool;
use crate::registry::{OperatorDescriptor, ParamError};
use crate::transform::encode::{EncodeParams, EncodeSource, JpegEncoder, check_quality};
use crate::yuv;

/// Image file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// JPEG at `quality`.
    Jpeg,
    /// Lossless PNG (fast compression).
    Png,
    /// No image files: the index lines only.
    None,
}

impl ImageFormat {
    /// The format's name in messages.
    fn extension_name(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Png => "png",
            ImageFormat::None => "none",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Png => "png",
            ImageFormat::None => "",
        }
    }
}

/// Parameters of `sink.folder`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FolderParams {
    /// Directory to write into.
    #[schemars(with = "crate::params::FileParam")]
    pub path: PathBuf,
    /// Create the directory (and its parents) when it does not exist; otherwise a missing
    /// directory is an error before the pipeline starts.
    #[serde(default)]
    pub create: bool,
    /// Image file format.
    #[serde(default = "default_format")]
    pub format: ImageFormat,
    /// JPEG quality, 1-100.
    #[serde(default = "default_quality")]
    #[schemars(range(min = 1, max = 100))]
    pub quality: u8,
    /// File name without extension; `{stream}`, `{seq}` (zero-padded to 8 digits) and
    /// `{timestamp_ms}` (capture time) are replaced.
    #[serde(default = "default_file_pattern")]
    #[schemars(length(min = 1))]
    pub file_pattern: String,
    /// Name of the JSON-lines index file inside `path`.
    #[serde(default = "default_index_file")]
    #[schemars(length(min = 1))]
    pub index_file: String,
    /// Delete the oldest images beyond these limits (none by default).
    #[serde(default)]
    pub retention: Retention,
    /// Which results are written and what they carry (default output formats:
    /// `image_with_predictions` and `predictions`).
    #[serde(flatten)]
    pub dispatch: DispatchParams,
}

/// How many images `sink.folder` keeps.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Keep at most this many image files.
    #[schemars(range(min = 1))]
    pub keep_last: Option<u64>,
    /// Keep at most this many bytes of image files.
    #[schemars(range(min = 1))]
    pub keep_bytes: Option<u64>,
}

fn default_format() -> ImageFormat {
    ImageFormat::Jpeg
}
fn default_quality() -> u8 {
    90
}
fn default_file_pattern() -> String {
    "{stream}_{seq}".into()
}
fn default_index_file() -> String {
    "results.jsonl".into()
}

impl FolderParams {
    /// The rules the schema cannot express: a JPEG quality, plain file names, the dispatch
    /// settings. (The folder itself is checked when the sink is built.)
    pub fn validate(&self) -> Result<(), ParamError> {
        check_quality("quality", self.quality)?;
        for (field, value) in [
            ("file_pattern", &self.file_pattern),
            ("index_file", &self.index_file),
        ] {
            if value.contains(['/', '\\']) || value == ".." || value.is_empty() {
                return Err(ParamError::new(
                    field,
                    format!("'{value}' must be a plain file name"),
                ));
            }
        }
        // Lines are appended to the index: never to an image of the folder.
        let index = self.index_file.to_ascii_lowercase();
        if [".jpg", ".jpeg", ".png"].iter().any(|e| index.ends_with(e)) {
            return Err(ParamError::new(
                "index_file",
                format!(
                    "'{}' is an image's name; the index is a JSON-lines file (results.jsonl)",
                    self.index_file
                ),
            ));
        }
        self.dispatch.validate()
    }
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<FolderParams>(
        "sink.folder",
        OperatorKind::Sink,
        "Writes the images a result asks for (JPEG, PNG or none; already-encoded JPEG bytes as they are) under a temporary name and renames them, and appends one prediction message per result to the index file once its images are in place; retention by count or bytes.",
    )
    .input("in", PortType::Image)
    .validate(FolderParams::validate)
    .build_with(|params, _context| Ok(OperatorInstance::Sink(Box::new(FolderSink::open(params)?))))
}

/// The running sink.
pub struct FolderSink {
    params: FolderParams,
    dispatch: Dispatch,
    pipeline: Arc<str>,
    health: Arc<EndpointHealth>,
    index: BufWriter<File>,
    /// Image files present, oldest first, with their sizes (for `retention`).
    kept: VecDeque<(PathBuf, u64)>,
    kept_bytes: u64,
    encoded: Vec<u8>,
    /// libjpeg-turbo, for `format: jpeg`.
    jpeg: Option<JpegEncoder>,
    /// Rows without padding, when a frame's rows are padded.
    packed_scratch: Vec<u8>,
    /// RGB copy of a BGR frame for the PNG encoder, which has no BGR input.
    rgb_scratch: Vec<u8>,
    /// RGB conversions of I420 frames.
    rgb_pool: BufferPool<u8>,
}

impl FolderSink {
    /// Checks that the directory exists (or creates it) and is writable, and opens the index.
    pub fn open(mut params: FolderParams) -> Result<Self, OpError> {
        params.validate()?;
        let dir = &params.path;
        if !dir.exists() {
            if params.create {
                std::fs::create_dir_all(dir).map_err(|e| {
                    OpError::io(format!("cannot create directory {}", dir.display()), e)
                })?;
            } else {
                return Err(OpError::param(
                    "path",
                    format!(
                        "directory {} does not exist (set `create: true` to create it)",
                        dir.display()
                    ),
                ));
            }
        } else if !dir.is_dir() {
            return Err(OpError::param(
                "path",
                format!("{} is not a directory", dir.display()),
            ));
        }
        let index_path = dir.join(&params.index_file);
        // Never through a symbolic link: the index is appended to, so a link planted under its
        // name would send results to a file outside the folder.
        let index = OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&index_path)
            .map_err(|e| {
                OpError::param(
                    "path",
                    format!(
                        "cannot write the index {} ({e}): is the directory writable?",
                        index_path.display()
                    ),
                )
            })?;
        let dispatch = Dispatch::new(
            std::mem::take(&mut params.dispatch),
            &[
                OutputFormat::ImageWithPredictions,
                OutputFormat::Predictions,
            ],
        )?;
        let kept = existing_images(dir, &index_path)?;
        let kept_bytes = kept.iter().map(|(_, size)| size).sum();
        let jpeg = match params.format {
            ImageFormat::Jpeg => Some(JpegEncoder::new(EncodeParams {
                quality: params.quality,
                source: EncodeSource::Frame,
            })?),
            _ => None,
        };
        Ok(Self {
            params,
            dispatch,
            pipeline: Arc::from(""),
            health: Arc::default(),
            index: BufWriter::new(index),
            kept,
            kept_bytes,
            encoded: Vec::new(),
            jpeg,
            packed_scratch: Vec::new(),
            rgb_scratch: Vec::new(),
            rgb_pool: BufferPool::new(2),
        })
    }

    fn file_stem(&self, frame: &Frame) -> String {
        let capture_ms = frame.capture.unix_ms();
        self.params
            .file_pattern
            .replace("{stream}", &sanitise(&frame.stream_id))
            .replace("{seq}", &format!("{:08}", frame.sequence))
            .replace("{timestamp_ms}", &capture_ms.to_string())
    }

    fn write_image(&mut self, frame: &Frame, name: &str) -> Result<(), OpError> {
        match self.params.format {
            ImageFormat::Jpeg => {
                if let Some(jpeg) = &mut self.jpeg {
                    let encoded = jpeg.encode(frame)?;
                    return write_atomically(&self.params.path, name, encoded.bytes());
                }
                return Err(OpError::Failed("JPEG encoder missing".into()));
            }
            ImageFormat::Png => {}
            ImageFormat::None => return Ok(()),
        }
        self.encoded.clear();
        let converted;
        let frame = if frame.layout.format == PixelFormat::I420 {
            converted = yuv::to_rgb_frame(frame, &self.rgb_pool);
            &converted
        } else {
            frame
        };
        let pixels = packed_pixels(frame, &mut self.packed_scratch);
        let layout = frame.layout;
        let pixels = if layout.format == PixelFormat::Bgr {
            swap_to_rgb(pixels, &mut self.rgb_scratch)
        } else {
            pixels
        };
        let mut encoder = png::Encoder::new(&mut self.encoded, layout.width, layout.height);
        encoder.set_color(match layout.format {
            PixelFormat::Gray => png::ColorType::Grayscale,
            PixelFormat::Rgb | PixelFormat::Bgr | PixelFormat::I420 => png::ColorType::Rgb,
        });
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Fast);
        let mut writer = encoder
            .write_header()
            .map_err(|e| OpError::Failed(format!("PNG encoding: {e}")))?;
        writer
            .write_image_data(pixels)
            .map_err(|e| OpError::Failed(format!("PNG encoding: {e}")))?;
        writer
            .finish()
            .map_err(|e| OpError::Failed(format!("PNG encoding: {e}")))?;
        write_atomically(&self.params.path, name, &self.encoded)
    }
}

impl FolderSink {
    /// Writes one image file for `format` and describes it for the message.
    fn write_part(
        &mut self,
        packet: &Packet,
        format: OutputFormat,
        name: String,
    ) -> Result<ImagePart, OpError> {
        let frame = match format {
            OutputFormat::ImageOriginal => &packet.frame,
            _ => packet.overlay.as_ref().unwrap_or(&packet.frame),
        };
        match (&packet.encoded, self.params.format, format) {
            // An upstream encode.jpeg already encoded the overlay: write its bytes as they are.
            (Some(encoded), ImageFormat::Jpeg, OutputFormat::ImageWithPredictions)
                if encoded.format == "jpeg" =>
            {
                write_atomically(&self.params.path, &name, encoded.bytes())?
            }
            _ => self.write_image(frame, &name)?,
        }
        self.keep(&name)?;
        Ok(ImagePart {
            format: self.params.format.extension_name().to_string(),
            width: frame.layout.width,
            height: frame.layout.height,
            data: None,
            file: Some(name),
        })
    }

    /// Notes a new image file and deletes the oldest ones beyond the retention limits.
    fn keep(&mut self, name: &str) -> Result<(), OpError> {
        let path = self.params.path.join(name);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        self.kept.push_back((path, size));
        self.kept_bytes += size;
        let Retention {
            keep_last,
            keep_bytes,
        } = self.params.retention;
        while self.kept.len() > 1
            && (keep_last.is_some_and(|n| self.kept.len() as u64 > n)
                || keep_bytes.is_some_and(|n| self.kept_bytes > n))
        {
            let Some((oldest, size)) = self.kept.pop_front() else {
                break;
            };
            self.kept_bytes -= size;
            match std::fs::remove_file(&oldest) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(OpError::io(
                        format!("deleting {} (retention)", oldest.display()),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Sink for FolderSink {
    fn attach(&mut self, ctx: &SinkContext) {
        self.pipeline = Arc::clone(&ctx.pipeline);
        self.health = Arc::clone(&ctx.health);
    }

    fn consume(&mut self, packet: Packet) -> Result<(), OpError> {
        if !self.dispatch.admit(&packet, &self.health) {
            return Ok(());
        }
        let mut images = Images::default();
        if self.params.format != ImageFormat::None {
            let stem = self.file_stem(&packet.frame);
            let extension = self.params.format.extension();
            let both = self.dispatch.wants(OutputFormat::ImageOriginal)
                && self.dispatch.wants(OutputFormat::ImageWithPredictions);
            if self.dispatch.wants(OutputFormat::ImageWithPredictions) {
                let name = format!("{stem}.{extension}");
                images.with_predictions =
                    Some(self.write_part(&packet, OutputFormat::ImageWithPredictions, name)?);
            }
            if self.dispatch.wants(OutputFormat::ImageOriginal) {
                let name = if both {
                    format!("{stem}_original.{extension}")
                } else {
                    format!("{stem}.{extension}")
                };
                images.original =
                    Some(self.write_part(&packet, OutputFormat::ImageOriginal, name)?);
            }
        }
        let line = self.dispatch.message(&self.pipeline, &packet, images);
        let index_path = || {
            self.params
                .path
                .join(&self.params.index_file)
                .display()
                .to_string()
        };
        serde_json::to_writer(&mut self.index, &line)
            .map_err(|e| OpError::Failed(format!("writing {}: {e}", index_path())))?;
        self.index
            .write_all(b"\n")
            .and_then(|()| self.index.flush())
            .map_err(|e| OpError::io(format!("writing {}", index_path()), e))
    }

    fn finish(&mut self) -> Result<(), OpError> {
        self.index
            .get_ref()
            .sync_all()
            .map_err(|e| OpError::io(format!("syncing {}", self.params.index_file), e))
    }
}

/// The image files an earlier run of this sink wrote into `dir` and recorded in its index
/// (`index_path`), oldest first, with their sizes: retention deletes only what the sink wrote,
/// never other images that share the folder (a dataset, another tool's).
fn existing_images(dir: &Path, index_path: &Path) -> Result<VecDeque<(PathBuf, u64)>, OpError> {
    /// A line of the index, as far as its files go.
    #[derive(Deserialize)]
    struct IndexLine {
        #[serde(default)]
        images: std::collections::BTreeMap<String, Option<IndexImage>>,
    }
    #[derive(Deserialize)]
    struct IndexImage {
        file: Option<String>,
    }
    /// Longer lines are not this sink's (they are skipped).
    const MAX_LINE_BYTES: u64 = 1 << 20;
    let io = |e| OpError::io(format!("reading {}", index_path.display()), e);
    let mut reader = std::io::BufReader::new(File::open(index_path).map_err(io)?);
    let mut seen = std::collections::HashSet::new();
    let mut images = VecDeque::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut line)
            .map_err(io)?;
        if read == 0 {
            break;
        }
        if line.last() != Some(&b'\n') && read as u64 == MAX_LINE_BYTES {
            // Skip the rest of an overlong line.
            reader.skip_until(b'\n').map_err(io)?;
            continue;
        }
        let Ok(parsed) = serde_json::from_slice::<IndexLine>(&line) else {
            continue;
        };
        let files = parsed.images.into_values().flatten();
        for name in files.filter_map(|image| image.file) {
            let plain = !name.is_empty()
                && !name.starts_with('.')
                && !name.contains(['/', '\\'])
                && (name.ends_with(".jpg") || name.ends_with(".png"));
            if plain && seen.insert(name.clone()) {
                let path = dir.join(&name);
                if let Ok(metadata) = std::fs::symlink_metadata(&path)
                    && metadata.is_file()
                {
                    images.push_back((path, metadata.len()));
                }
            }
        }
    }
    Ok(images)
}

/// Writes `bytes` to `dir/name` atomically (see [`crate::files::write_atomically`]).
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), OpError> {
    let target = dir.join(name);
    crate::files::write_atomically(&target, bytes)
        .map_err(|e| OpError::io(format!("writing {}", target.display()), e))
}

/// The frame's pixels without row padding (copied into `scratch` only when rows are padded).
fn packed_pixels<'a>(frame: &'a Frame, scratch: &'a mut Vec<u8>) -> &'a [u8] {
    let layout = frame.layout;
    let row = layout.width as usize * layout.format.channels();
    if layout.stride == row {
        return &frame.pixels()[..layout.byte_len()];
    }
    scratch.clear();
    for y in 0..layout.height as usize {
        scratch.extend_from_slice(&frame.pixels()[y * layout.stride..y * layout.stride + row]);
    }
    scratch
}

fn swap_to_rgb<'a>(bgr: &[u8], scratch: &'a mut Vec<u8>) -> &'a [u8] {
    let mut rgb = std::mem::take(scratch);
    rgb.clear();
    rgb.extend(bgr.chunks_exact(3).flat_map(|p| [p[2], p[1], p[0]]));
    *scratch = rgb;
    scratch
}

/// Stream ids come from users; keep file names to a safe alphabet.
fn sanitise(stream: &str) -> String {
    stream
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_planted_as_a_link_is_refused_not_followed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outside = dir.path().join("outside.jsonl");
        std::fs::write(&outside, b"").expect("write");
        let folder = dir.path().join("results");
        std::fs::create_dir(&folder).expect("mkdir");
        std::os::unix::fs::symlink(&outside, folder.join("index.jsonl")).expect("link");
        let params: FolderParams = serde_json::from_value(
            serde_json::json!({"path": folder, "index_file": "index.jsonl"}),
        )
        .expect("valid parameters");
        let error = FolderSink::open(params).err().expect("refused");
        assert!(error.to_string().contains("index"), "{error}");
        assert_eq!(std::fs::read(&outside).expect("read"), b"");
    }

    #[test]
    fn an_index_named_like_an_image_is_refused() {
        let params: FolderParams =
            serde_json::from_value(serde_json::json!({"path": "/tmp", "index_file": "photo.JPG"}))
                .expect("parses");
        let error = params.validate().expect_err("refused");
        assert_eq!(error.field, "index_file");
    }

    #[test]
    fn retention_adopts_only_the_images_its_index_names() {
        let dir = tempfile::tempdir().expect("temp dir");
        let folder = dir.path();
        for name in ["part_00000001.png", "cam_00000000.jpg", "cam_00000001.jpg"] {
            std::fs::write(folder.join(name), b"image").expect("write");
        }
        let index = folder.join("results.jsonl");
        let lines = [
            r#"{"sequence":0,"images":{"with_predictions":{"format":"jpeg","file":"cam_00000000.jpg"}}}"#,
            "not JSON",
            r#"{"sequence":1,"images":{"with_predictions":{"file":"cam_00000001.jpg"},"original":null}}"#,
            r#"{"sequence":2,"images":{"with_predictions":{"file":"cam_gone.jpg"}}}"#,
            r#"{"sequence":3,"images":{"with_predictions":{"file":"../escape.jpg"}}}"#,
            r#"{"sequence":4,"images":{"with_predictions":{"file":"results.jsonl"}}}"#,
        ];
        std::fs::write(&index, lines.join("\n")).expect("index");
        let adopted: Vec<String> = existing_images(folder, &index)
            .expect("listed")
            .into_iter()
            .map(|(path, size)| {
                assert_eq!(size, 5);
                path.file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(adopted, ["cam_00000000.jpg", "cam_00000001.jpg"]);
    }
}
