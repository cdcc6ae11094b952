//! Cameras: `source.ip_camera` (RTSP, HTTP(S) MJPEG) and `source.usb_camera` (V4L2).
//!
//! Cameras drop: a network glitch, a rebooting camera, an unplugged cable. A camera source never
//! fails its graph for that. [`Reconnecting`] notices the loss (an error from GStreamer, the end
//! of the stream, or no frame for `stall_timeout_ms`), marks the source offline in the metrics
//! (one outage counted), tears the GStreamer pipeline down and builds a new one after a backoff
//! that doubles up to `max_backoff_ms`; the first frame that arrives marks it online again.
//!
//! Credentials never appear in logs, errors or metrics: user and password given in the URL are
//! taken out of it and handed to GStreamer as properties, and every place that shows the URL
//! shows [`redact_url`]'s version. Prefer `password_env`, which keeps the password out of the
//! graph file too.

use crate::url::{host_and_port, redact_url, split_credentials};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gstreamer::prelude::*;
use serde::Deserialize;

use super::{AppSinkReader, DecoderThreads, Pace, Pulled, VideoFormat, link_decoded_video, make};
use crate::contract::{
    OpError, OperatorInstance, OperatorKind, OutputType, PortType, Source, SourceContext,
    SourcePoll,
};
use crate::packet::{CaptureTime, Frame, Packet};
use crate::registry::{OperatorDescriptor, ParamError};
use crate::retry::RetrySettings;

/// How long one `next` call waits for a frame before returning to the runtime.
const PULL_SLICE: Duration = Duration::from_millis(100);

/// Reconnection settings shared by the camera sources.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconnectParams {
    /// The wait between attempts (`initial_backoff_ms`, `max_backoff_ms`).
    #[serde(flatten)]
    pub retry: RetrySettings,
    /// A camera that sends no frame for this long, in milliseconds, counts as lost.
    #[serde(default = "default_stall_timeout_ms")]
    #[schemars(range(min = 100))]
    pub stall_timeout_ms: u64,
    /// How long a new connection may take to deliver its first frame, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    #[schemars(range(min = 100))]
    pub connect_timeout_ms: u64,
}

fn default_stall_timeout_ms() -> u64 {
    5_000
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}

impl Default for ReconnectParams {
    fn default() -> Self {
        Self {
            retry: RetrySettings::default(),
            stall_timeout_ms: default_stall_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
        }
    }
}

impl ReconnectParams {
    /// The rules the schema cannot express (the backoff in order); fields are named from the
    /// parameters, `reconnect.max_backoff_ms`.
    pub fn validate(&self) -> Result<(), ParamError> {
        self.retry.validate().map_err(|e| e.within("reconnect"))
    }
}

/// RTSP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RtspTransport {
    /// RTP interleaved in the RTSP TCP connection: passes firewalls and NAT, never loses packets.
    #[default]
    Tcp,
    /// RTP over UDP: lowest latency on a clean network.
    Udp,
}

/// Parameters of `source.ip_camera`. (No `Debug`: it may hold a password.)
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IpCameraParams {
    /// `rtsp://`, `rtsps://`, `http://` or `https://` (MJPEG) address. A `user:password@` part is
    /// accepted but never logged.
    pub url: String,
    /// User name (overrides one in the URL).
    #[serde(default)]
    pub username: Option<String>,
    /// Password (overrides one in the URL). Prefer `password_env`.
    #[serde(default)]
    pub password: Option<String>,
    /// Name of an environment variable holding the password (not one of inspectflow's own
    /// `INSPECTFLOW_*` settings).
    #[serde(default)]
    pub password_env: Option<String>,
    /// RTSP transport.
    #[serde(default)]
    pub transport: RtspTransport,
    /// RTSP jitter buffer, in milliseconds.
    #[serde(default = "default_latency_ms")]
    pub latency_ms: u32,
    /// Pixel format of the frames.
    #[serde(default)]
    pub format: VideoFormat,
    /// When and how to reconnect.
    #[serde(default)]
    pub reconnect: ReconnectParams,
    /// Stream id stamped on frames (default: the node id).
    #[serde(default)]
    pub stream_id: Option<String>,
}

fn default_latency_ms() -> u32 {
    200
}

/// A V4L2 device: its index (`0` for `/dev/video0`) or its path.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum UsbDevice {
    /// `/dev/video<index>`.
    Index(u32),
    /// A V4L2 device path: `/dev/video<N>` or a stable link to one under `/dev/v4l/by-id/` or
    /// `/dev/v4l/by-path/`.
    Path(
        #[schemars(regex(
            pattern = r"^/dev/(video[0-9]+|v4l/by-(id|path)/[A-Za-z0-9_:+-][A-Za-z0-9_.:+-]*)$"
        ))]
        PathBuf,
    ),
}

impl UsbDevice {
    fn path(&self) -> PathBuf {
        match self {
            UsbDevice::Index(index) => PathBuf::from(format!("/dev/video{index}")),
            UsbDevice::Path(path) => path.clone(),
        }
    }

    /// The device file this names, links resolved, when it is a V4L2 character device
    /// (`/dev/video<N>`): a link under `/dev/v4l/` that leads anywhere else is refused.
    fn open_path(&self) -> Result<PathBuf, String> {
        use std::os::unix::fs::FileTypeExt;
        let path = self.path();
        let resolved =
            std::fs::canonicalize(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let is_video_node = resolved
            .to_str()
            .and_then(|name| name.strip_prefix("/dev/video"))
            .is_some_and(|number| !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()));
        let is_char_device = std::fs::metadata(&resolved)
            .map(|meta| meta.file_type().is_char_device())
            .unwrap_or(false);
        if is_video_node && is_char_device {
            Ok(resolved)
        } else {
            Err(format!(
                "{} is not a V4L2 device (it leads to {})",
                path.display(),
                resolved.display()
            ))
        }
    }
}

/// Parameters of `source.usb_camera`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsbCameraParams {
    /// The camera.
    #[serde(default = "default_device")]
    pub device: UsbDevice,
    /// Capture width in pixels (the camera's default when absent).
    #[serde(default)]
    pub width: Option<u32>,
    /// Capture height in pixels.
    #[serde(default)]
    pub height: Option<u32>,
    /// Capture frame rate.
    #[serde(default)]
    pub fps: Option<u32>,
    /// Pixel format of the frames.
    #[serde(default)]
    pub format: VideoFormat,
    /// When and how to reconnect (a camera unplugged and plugged back).
    #[serde(default)]
    pub reconnect: ReconnectParams,
    /// Stream id stamped on frames (default: the node id).
    #[serde(default)]
    pub stream_id: Option<String>,
}

fn default_device() -> UsbDevice {
    UsbDevice::Index(0)
}

impl IpCameraParams {
    /// The rules the schema cannot express: an address GStreamer can read, the backoff in
    /// order. (Whether `password_env` is set is checked when the source is built, where it runs.)
    pub fn validate(&self) -> Result<(), ParamError> {
        // Control characters (a NUL above all) cannot reach GStreamer's C strings; the value
        // is not shown, as it may hold a password.
        for (field, value) in [
            ("url", Some(&self.url)),
            ("username", self.username.as_ref()),
            ("password", self.password.as_ref()),
            ("password_env", self.password_env.as_ref()),
        ] {
            if value.is_some_and(|value| value.chars().any(char::is_control)) {
                return Err(ParamError::new(field, "holds a control character"));
            }
        }
        if let Some(variable) = &self.password_env {
            crate::secrets::check_variable(variable)
                .map_err(|message| ParamError::new("password_env", message))?;
        }
        camera_url(&self.url)?;
        self.reconnect.validate()
    }
}

/// The camera's address without user information; the error never shows credentials.
fn camera_url(text: &str) -> Result<String, ParamError> {
    let (url, _, _) = split_credentials(text);
    let scheme = url
        .split("://")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if !matches!(scheme.as_str(), "rtsp" | "rtsps" | "http" | "https") || !url.contains("://") {
        return Err(ParamError::new(
            "url",
            format!(
                "'{}' is not an rtsp://, rtsps://, http:// or https:// address",
                redact_url(text)
            ),
        ));
    }
    Ok(url)
}

/// Whether the camera's host accepts a TCP connection (within 3 s).
fn host_accepts_connections(url: &str) -> Result<(), ParamError> {
    let fail = |message: String| ParamError::new("url", message);
    let (host, port) = host_and_port(url)
        .ok_or_else(|| fail(format!("cannot read a host from {}", redact_url(url))))?;
    let addresses = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .map_err(|e| fail(format!("cannot resolve {host}: {e}")))?;
    for address in addresses {
        if std::net::TcpStream::connect_timeout(&address, Duration::from_secs(3)).is_ok() {
            return Ok(());
        }
    }
    Err(fail(format!("{host}:{port} does not accept connections")))
}

impl UsbCameraParams {
    /// The rules the schema cannot express: positive capture caps, the backoff in order.
    pub fn validate(&self) -> Result<(), ParamError> {
        for (field, value) in [
            ("width", self.width),
            ("height", self.height),
            ("fps", self.fps),
        ] {
            if value == Some(0) {
                return Err(ParamError::new(field, "must be positive, got 0"));
            }
        }
        self.reconnect.validate()
    }
}

/// The registry entry of `source.ip_camera`.
pub fn ip_camera_descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<IpCameraParams>(
        "source.ip_camera",
        OperatorKind::Source,
        "Reads an RTSP/RTSPS (TCP or UDP, `latency_ms`) or HTTP(S) MJPEG camera, credentials kept out of logs; when it drops, stays up, shows it offline and reconnects with backoff.",
    )
    .output("out", OutputType::Fixed(PortType::Image))
    .live_when(|_| true)
    .validate(IpCameraParams::validate)
    .health_check(|params| host_accepts_connections(&params.url))
    .build_with(|params, context| {
        let camera = IpCamera::new(params)?;
        Ok(OperatorInstance::Source(Box::new(Reconnecting::new(
            Box::new(camera.clone()),
            camera.redacted_url.clone(),
            camera.reconnect.clone(),
            camera.stream_id.as_deref().unwrap_or(context.node_id),
        ))))
    })
}

/// The registry entry of `source.usb_camera`.
pub fn usb_camera_descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<UsbCameraParams>(
        "source.usb_camera",
        OperatorKind::Source,
        "Reads a V4L2 (USB) camera by index or path, with optional `width`/`height`/`fps` caps (raw or MJPEG); reconnects like the IP camera when it is unplugged.",
    )
    .output("out", OutputType::Fixed(PortType::Image))
    .live_when(|_| true)
    .validate(UsbCameraParams::validate)
    .health_check(|params| {
        let device = params.device.path();
        if device.exists() {
            Ok(())
        } else {
            Err(ParamError::new(
                "device",
                format!("no camera at {}", device.display()),
            ))
        }
    })
    .build_with(|params, context| {
        let label = params.device.path().display().to_string();
        let stream_id = params
            .stream_id
            .clone()
            .unwrap_or_else(|| context.node_id.into());
        let reconnect = params.reconnect.clone();
        Ok(OperatorInstance::Source(Box::new(Reconnecting::new(
            Box::new(params),
            label,
            reconnect,
            &stream_id,
        ))))
    })
}

/// Builds a camera's GStreamer pipeline, once per connection attempt.
trait Connect: Send {
    fn connect(&self) -> Result<AppSinkReader, String>;
}

/// An IP camera's settings with the credentials separated from the URL.
#[derive(Clone)]
struct IpCamera {
    /// The URL without user information.
    url: String,
    redacted_url: String,
    username: Option<String>,
    password: Option<String>,
    transport: RtspTransport,
    latency_ms: u32,
    format: VideoFormat,
    reconnect: ReconnectParams,
    stream_id: Option<String>,
}

impl IpCamera {
    fn new(params: IpCameraParams) -> Result<Self, OpError> {
        params.validate()?;
        let url = camera_url(&params.url)?;
        let (_, url_user, url_password) = split_credentials(&params.url);
        let password = match &params.password_env {
            Some(variable) => Some(
                crate::secrets::read_password(variable)
                    .map_err(|message| OpError::param("password_env", message))?,
            ),
            None => params.password.or(url_password),
        };
        Ok(Self {
            redacted_url: redact_url(&url),
            url,
            username: params.username.or(url_user),
            password,
            transport: params.transport,
            latency_ms: params.latency_ms,
            format: params.format,
            reconnect: params.reconnect,
            stream_id: params.stream_id,
        })
    }

    fn is_rtsp(&self) -> bool {
        self.url.to_ascii_lowercase().starts_with("rtsp")
    }
}

impl Connect for IpCamera {
    fn connect(&self) -> Result<AppSinkReader, String> {
        let source = if self.is_rtsp() {
            let rtspsrc = make("rtspsrc").map_err(|e| e.to_string())?;
            rtspsrc.set_property("location", &self.url);
            rtspsrc.set_property("latency", self.latency_ms);
            rtspsrc.set_property_from_str(
                "protocols",
                match self.transport {
                    RtspTransport::Tcp => "tcp",
                    RtspTransport::Udp => "udp",
                },
            );
            // Give up on an unreachable server after 5 s instead of GStreamer's 20.
            rtspsrc.set_property("tcp-timeout", 5_000_000u64);
            rtspsrc
        } else {
            let http = make("souphttpsrc").map_err(|e| e.to_string())?;
            http.set_property("location", &self.url);
            http.set_property("is-live", true);
            http.set_property("timeout", 5u32);
            http
        };
        if let Some(user) = &self.username {
            source.set_property("user-id", user);
        }
        if let Some(password) = &self.password {
            source.set_property("user-pw", password);
        }
        let decodebin = make("decodebin").map_err(|e| e.to_string())?;
        let reader = AppSinkReader::new(
            &[source, decodebin],
            link_decoded_video,
            self.format,
            Pace::Realtime,
            DecoderThreads::Slices,
        )
        .map_err(|e| e.to_string())?;
        reader.start()?;
        Ok(reader)
    }
}

impl Connect for UsbCameraParams {
    fn connect(&self) -> Result<AppSinkReader, String> {
        let path = self.device.open_path()?;
        let v4l2src = make("v4l2src").map_err(|e| e.to_string())?;
        v4l2src.set_property("device", path.to_string_lossy().as_ref());
        // Raw or MJPEG, whichever the camera offers at the requested size and rate.
        let mut caps = gstreamer::Caps::new_empty();
        for media in ["video/x-raw", "image/jpeg"] {
            let mut structure = gstreamer::Structure::new_empty(media);
            if let Some(width) = self.width {
                structure.set("width", width as i32);
            }
            if let Some(height) = self.height {
                structure.set("height", height as i32);
            }
            if let Some(fps) = self.fps {
                structure.set("framerate", gstreamer::Fraction::new(fps as i32, 1));
            }
            caps.get_mut()
                .ok_or("caps are shared")?
                .append_structure(structure);
        }
        let filter = make("capsfilter").map_err(|e| e.to_string())?;
        filter.set_property("caps", &caps);
        let decodebin = make("decodebin").map_err(|e| e.to_string())?;
        let reader = AppSinkReader::new(
            &[v4l2src, filter, decodebin],
            link_decoded_video,
            self.format,
            Pace::Realtime,
            DecoderThreads::Slices,
        )
        .map_err(|e| e.to_string())?;
        reader.start()?;
        Ok(reader)
    }
}

/// A camera source that survives its camera: connects, delivers, notices a loss, waits, and
/// connects again.
struct Reconnecting {
    camera: Box<dyn Connect>,
    /// The camera as shown in logs (no credentials).
    label: String,
    settings: ReconnectParams,
    stream_id: Arc<str>,
    reader: Option<AppSinkReader>,
    next_attempt: Instant,
    backoff: Duration,
    /// When the last frame arrived, or the connection was made.
    last_frame: Instant,
    /// Whether the current connection delivered a frame yet.
    delivering: bool,
    sequence: u64,
}

impl Reconnecting {
    fn new(
        camera: Box<dyn Connect>,
        label: String,
        settings: ReconnectParams,
        stream_id: &str,
    ) -> Self {
        Self {
            camera,
            label,
            backoff: settings.retry.initial(),
            settings,
            stream_id: stream_id.into(),
            reader: None,
            next_attempt: Instant::now(),
            last_frame: Instant::now(),
            delivering: false,
            sequence: 0,
        }
    }

    /// The camera is lost: offline, pipeline down, next attempt after the backoff.
    fn lost(&mut self, ctx: &SourceContext, reason: &str) {
        if let Some(reader) = self.reader.take() {
            ctx.health.count_dropped(reader.close());
        }
        let reason = format!("{}: {reason}", self.label);
        if ctx.health.set_offline(&reason) {
            tracing::warn!("camera offline, reconnecting: {reason}");
        } else {
            tracing::debug!("camera still offline: {reason}");
        }
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = self.settings.retry.next(self.backoff);
    }
}

impl Source for Reconnecting {
    fn next(&mut self, ctx: &SourceContext) -> Result<SourcePoll, OpError> {
        let Some(reader) = &mut self.reader else {
            let now = Instant::now();
            if now < self.next_attempt {
                ctx.stop
                    .sleep_until(self.next_attempt.min(now + PULL_SLICE));
                return Ok(SourcePoll::Pending);
            }
            match self.camera.connect() {
                Ok(reader) => {
                    self.reader = Some(reader);
                    self.last_frame = Instant::now();
                    self.delivering = false;
                }
                Err(reason) => self.lost(ctx, &reason),
            }
            return Ok(SourcePoll::Pending);
        };
        match reader.pull(PULL_SLICE) {
            Ok(Pulled::Frame(pixels, layout)) => {
                ctx.health.count_dropped(reader.take_dropped());
                if ctx.health.set_online() {
                    tracing::info!("camera back online: {}", self.label);
                }
                self.backoff = self.settings.retry.initial();
                self.last_frame = Instant::now();
                self.delivering = true;
                let frame = Frame::new(
                    pixels,
                    layout,
                    Arc::clone(&self.stream_id),
                    self.sequence,
                    CaptureTime::now(),
                );
                self.sequence += 1;
                Ok(SourcePoll::Packet(Packet::from_frame(frame)))
            }
            Ok(Pulled::Waiting) => {
                let stalled = self.last_frame.elapsed();
                let limit = if self.delivering {
                    self.settings.stall_timeout_ms
                } else {
                    self.settings.connect_timeout_ms
                };
                if stalled >= Duration::from_millis(limit) {
                    self.lost(ctx, &format!("no frame for {} ms", stalled.as_millis()));
                }
                Ok(SourcePoll::Pending)
            }
            Ok(Pulled::EndOfStream) => {
                self.lost(ctx, "the stream ended");
                Ok(SourcePoll::Pending)
            }
            Err(reason) => {
                self.lost(ctx, &redact_text(&reason));
                Ok(SourcePoll::Pending)
            }
        }
    }
}

/// GStreamer's own messages may quote the location; strip user information from any URL in them.
fn redact_text(text: &str) -> String {
    text.split(' ')
        .map(|word| {
            if word.contains("://") && word.contains('@') {
                redact_url(word)
            } else {
                word.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url_and_never_show() {
        let (url, user, password) = split_credentials("rtsp://admin:s3cret@10.0.0.5:554/stream1");
        assert_eq!(url, "rtsp://10.0.0.5:554/stream1");
        assert_eq!(user.as_deref(), Some("admin"));
        assert_eq!(password.as_deref(), Some("s3cret"));
        let shown = redact_url("rtsp://admin:s3cret@10.0.0.5:554/stream1?token=abc");
        assert!(!shown.contains("s3cret") && !shown.contains("admin") && !shown.contains("abc"));
        assert_eq!(
            shown,
            "rtsp://<credentials>@10.0.0.5:554/stream1?<redacted>"
        );
        assert_eq!(redact_url("http://cam/mjpeg"), "http://cam/mjpeg");
        assert!(!redact_text("could not open rtsp://u:p@host/x (refused)").contains("u:p"));
    }

    #[test]
    fn a_bad_scheme_is_refused_without_showing_the_password() {
        let params: IpCameraParams = serde_json::from_value(serde_json::json!({
            "url": "ftp://user:hunter2@cam/stream"
        }))
        .expect("parses");
        let error = IpCamera::new(params).err().expect("refused").to_string();
        assert!(
            error.contains("url") && !error.contains("hunter2"),
            "{error}"
        );
    }
}
