//! `source.images_folder`: the images already in a folder (sorted by name), then each new image
//! as other machines drop it there, each exactly once.
//!
//! A file is read only once it looks finished: its modification time is at least `settle_ms` old
//! and its size did not change since the previous scan. A file that still does not decode (a
//! writer that paused longer than that) is tried again when it changes, and given up, with a
//! warning, once it has stayed unchanged and unreadable for `incomplete_timeout_ms`. Files whose
//! names start with a dot, and extensions other than PNG and JPEG, are ignored, so writers that
//! write `.name.tmp` and rename are picked up at the rename. A folder that vanishes (an unmounted
//! share) puts the source offline until it is back.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use crate::contract::{
    OpError, OperatorInstance, OperatorKind, OutputType, PortType, Source, SourceContext,
    SourcePoll,
};
use crate::decode;
use crate::packet::Packet;
use crate::pool::BufferPool;
use crate::registry::{OperatorDescriptor, ParamError};

/// Parameters of `source.images_folder`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImagesFolderParams {
    /// The folder to read.
    #[schemars(with = "crate::params::FileParam")]
    pub path: PathBuf,
    /// Skip the images present at start; only new ones are read.
    #[serde(default)]
    pub ignore_existing_images: bool,
    /// Keep watching for new images. Off: the stream ends after the images present at start.
    #[serde(default = "default_watch")]
    pub watch: bool,
    /// How often the folder is scanned, in milliseconds.
    #[serde(default = "default_poll_interval_ms")]
    #[schemars(range(min = 10))]
    pub poll_interval_ms: u64,
    /// How long a file must stay unmodified before it is read, in milliseconds.
    #[serde(default = "default_settle_ms")]
    pub settle_ms: u64,
    /// How long an unchanged file that does not decode is waited for before it is skipped as
    /// not an image, in milliseconds.
    #[serde(default = "default_incomplete_timeout_ms")]
    pub incomplete_timeout_ms: u64,
    /// Stream id stamped on frames (default: the node id).
    #[serde(default)]
    pub stream_id: Option<String>,
}

fn default_watch() -> bool {
    true
}
fn default_poll_interval_ms() -> u64 {
    200
}
fn default_settle_ms() -> u64 {
    500
}
fn default_incomplete_timeout_ms() -> u64 {
    10_000
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<ImagesFolderParams>(
        "source.images_folder",
        OperatorKind::Source,
        "Reads the PNG and JPEG images in a folder in name order, then each new one as it arrives, once each and never half-written.",
    )
    .output("out", OutputType::Fixed(PortType::Image))
    .health_check(|params| folder_exists(&params.path))
    .build_with(|params, context| {
        Ok(OperatorInstance::Source(Box::new(ImagesFolderSource::open(
            params,
            context.node_id,
        )?)))
    })
}

/// The folder to read exists.
fn folder_exists(path: &std::path::Path) -> Result<(), ParamError> {
    if path.is_dir() {
        Ok(())
    } else {
        Err(ParamError::new(
            "path",
            format!("{} is not a folder", path.display()),
        ))
    }
}

/// What is known of a file not read yet.
struct Candidate {
    size: u64,
    modified: SystemTime,
    /// Size and time at which it failed to decode, if it did.
    failed_as: Option<(u64, SystemTime)>,
}

/// The largest image file read (a 100-megapixel PNG is well under it).
const MAX_FILE_BYTES: u64 = 512 << 20;

/// The running source.
pub struct ImagesFolderSource {
    params: ImagesFolderParams,
    stream_id: Arc<str>,
    pool: BufferPool<u8>,
    /// Files read, skipped or ignored: never looked at again.
    done: HashSet<PathBuf>,
    /// Files seen but not read yet, by name.
    waiting: BTreeMap<PathBuf, Candidate>,
    /// Files that look finished, in the order they are to be read.
    ready: VecDeque<PathBuf>,
    next_scan: Instant,
    scanned_once: bool,
    sequence: u64,
}

impl ImagesFolderSource {
    /// Checks the folder exists.
    pub fn open(params: ImagesFolderParams, node_id: &str) -> Result<Self, OpError> {
        folder_exists(&params.path)?;
        Ok(Self {
            stream_id: params.stream_id.as_deref().unwrap_or(node_id).into(),
            params,
            pool: BufferPool::new(8),
            done: HashSet::new(),
            waiting: BTreeMap::new(),
            ready: VecDeque::new(),
            next_scan: Instant::now(),
            scanned_once: false,
            sequence: 0,
        })
    }

    /// Lists the folder and moves files that look finished to `ready`.
    fn scan(&mut self) -> std::io::Result<()> {
        let first = !self.scanned_once;
        let settle = Duration::from_millis(self.params.settle_ms);
        let give_up = Duration::from_millis(self.params.incomplete_timeout_ms);
        let now = SystemTime::now();
        let mut present = Vec::new();
        let mut listed = HashSet::new();
        for entry in std::fs::read_dir(&self.params.path)? {
            let path = entry?.path();
            listed.insert(path.clone());
            if self.done.contains(&path) {
                continue;
            }
            if !is_image_name(&path) {
                tracing::debug!("ignoring {}: not a PNG or JPEG name", path.display());
                self.done.insert(path);
                continue;
            }
            let Ok(metadata) = std::fs::metadata(&path) else {
                continue; // gone between listing and looking
            };
            if !metadata.is_file() {
                continue;
            }
            if first && self.params.ignore_existing_images {
                self.done.insert(path);
                continue;
            }
            let size = metadata.len();
            if size > MAX_FILE_BYTES {
                tracing::warn!(
                    "skipping {}: {size} bytes, more than the {MAX_FILE_BYTES} an image may have",
                    path.display()
                );
                self.done.insert(path);
                continue;
            }
            let modified = metadata.modified()?;
            present.push(path.clone());
            let age = now.duration_since(modified).unwrap_or_default();
            match self.waiting.get_mut(&path) {
                None => {
                    // Present at start and old enough: ready at once. Otherwise wait for a
                    // second look with the same size.
                    let ready = first && age >= settle;
                    self.waiting.insert(
                        path.clone(),
                        Candidate {
                            size,
                            modified,
                            failed_as: None,
                        },
                    );
                    if ready {
                        self.ready.push_back(path);
                    }
                }
                Some(candidate) => {
                    let unchanged = candidate.size == size && candidate.modified == modified;
                    candidate.size = size;
                    candidate.modified = modified;
                    match candidate.failed_as {
                        Some(failed) if failed == (size, modified) && age >= give_up => {
                            tracing::warn!(
                                "skipping {}: unchanged for {} ms and not a readable image",
                                path.display(),
                                give_up.as_millis()
                            );
                            self.waiting.remove(&path);
                            self.done.insert(path);
                        }
                        // Failed to decode and unchanged since: wait for it to change.
                        Some(failed) if failed == (size, modified) => {}
                        _ if unchanged && age >= settle => self.ready.push_back(path),
                        _ => {}
                    }
                }
            }
        }
        // Files gone from the folder are forgotten: a long watch does not remember every name
        // it ever saw, and a new file under an old name is read.
        if self.done.len() > listed.len() {
            self.done.retain(|path| listed.contains(path));
        }
        // Files deleted before they were read are forgotten.
        if self.waiting.len() > present.len() {
            let present: HashSet<&PathBuf> = present.iter().collect();
            self.waiting.retain(|path, _| present.contains(path));
        }
        // Ready files in name order (scans run only once `ready` is empty).
        self.ready.make_contiguous().sort();
        self.scanned_once = true;
        Ok(())
    }

    /// Reads one ready file: a frame, or `None` when it is not readable (yet).
    fn read(&mut self, path: PathBuf) -> Option<Packet> {
        match decode::read_rgb(&path, &self.pool, self.sequence) {
            Ok(mut frame) => {
                frame.stream_id = Arc::clone(&self.stream_id);
                self.sequence += 1;
                self.waiting.remove(&path);
                self.done.insert(path);
                Some(Packet::from_frame(frame))
            }
            Err(error) => {
                if let Some(candidate) = self.waiting.get_mut(&path) {
                    tracing::debug!("{} not readable yet: {error}", path.display());
                    candidate.failed_as = Some((candidate.size, candidate.modified));
                }
                None
            }
        }
    }
}

fn is_image_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if name.starts_with('.') {
        return false;
    }
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    matches!(extension.as_str(), "png" | "jpg" | "jpeg")
}

impl Source for ImagesFolderSource {
    fn next(&mut self, ctx: &SourceContext) -> Result<SourcePoll, OpError> {
        while let Some(path) = self.ready.pop_front() {
            if let Some(packet) = self.read(path) {
                return Ok(SourcePoll::Packet(packet));
            }
        }
        if self.scanned_once && !self.params.watch && self.waiting.is_empty() {
            return Ok(SourcePoll::EndOfStream);
        }
        let now = Instant::now();
        if now < self.next_scan {
            ctx.stop
                .sleep_until(self.next_scan.min(now + Duration::from_millis(100)));
            return Ok(SourcePoll::Pending);
        }
        self.next_scan = now + Duration::from_millis(self.params.poll_interval_ms);
        match self.scan() {
            Ok(()) => {
                if ctx.health.set_online() {
                    tracing::info!("folder {} is back", self.params.path.display());
                }
            }
            Err(error) => {
                let reason = format!("cannot list {}: {error}", self.params.path.display());
                if ctx.health.set_offline(&reason) {
                    tracing::warn!("{reason}");
                }
            }
        }
        Ok(SourcePoll::Pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path, level: u8) {
        image::RgbImage::from_pixel(4, 4, image::Rgb([level; 3]))
            .save(path)
            .expect("PNG");
    }

    /// Scans once and reads every ready file: the levels of the frames read.
    fn scan_and_read(source: &mut ImagesFolderSource) -> Vec<u8> {
        source.scan().expect("scan");
        let mut levels = Vec::new();
        while let Some(path) = source.ready.pop_front() {
            if let Some(packet) = source.read(path) {
                levels.push(packet.frame.pixels()[0]);
            }
        }
        levels
    }

    #[test]
    fn a_watch_forgets_files_that_are_gone_and_reads_a_new_file_under_an_old_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let params: ImagesFolderParams = serde_json::from_value(serde_json::json!({
            "path": dir.path(), "watch": true, "settle_ms": 0
        }))
        .expect("parameters");
        let mut source = ImagesFolderSource::open(params, "folder").expect("open");
        png(&dir.path().join("part.png"), 10);
        std::fs::write(dir.path().join("notes.txt"), b"not an image").expect("write");
        assert_eq!(scan_and_read(&mut source), [10]);
        assert_eq!(scan_and_read(&mut source), Vec::<u8>::new(), "read once");
        std::fs::remove_file(dir.path().join("part.png")).expect("remove");
        std::fs::remove_file(dir.path().join("notes.txt")).expect("remove");
        assert_eq!(scan_and_read(&mut source), Vec::<u8>::new());
        assert!(source.done.is_empty(), "{:?}", source.done);
        png(&dir.path().join("part.png"), 20);
        // A new file waits for a second look with the same size.
        let mut levels = scan_and_read(&mut source);
        levels.extend(scan_and_read(&mut source));
        assert_eq!(levels, [20]);
    }
}
