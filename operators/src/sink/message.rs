//! The prediction message, the one documented shape in which results leave the engine (MQTT
//! payloads, webhook bodies, the lines of `sink.folder`'s index), and the dispatch settings every
//! result sink shares: which parts a message carries (`output_formats`), at most how many per
//! second (`rate_limit`), and whether only anomalous frames go out (`only_anomalous`).
//!
//! The JSON Schema of the message is `schemas/prediction-message.schema.json`, generated from
//! [`PredictionMessage`] by `inspectflow schemas`.

use std::time::{Duration, Instant};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::contract::{EndpointHealth, OpError};
pub use crate::packet::Label;
use crate::packet::{Frame, Packet};
use crate::registry::ParamError;
use crate::transform::encode::{EncodeParams, EncodeSource, JpegEncoder};

/// A part a result message can carry (the names Geti Inspect's users know).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    /// The frame as captured.
    ImageOriginal,
    /// The heatmap overlay (the frame when no `heatmap` ran upstream).
    ImageWithPredictions,
    /// Score, label, threshold and model id (when an `anomaly` operator ran upstream).
    Predictions,
}

/// Dispatch settings shared by the result sinks (flattened into their parameters).
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct DispatchParams {
    /// What each result carries: `predictions`, `image_original`, `image_with_predictions`.
    /// The default depends on the sink.
    #[serde(default)]
    pub output_formats: Option<Vec<OutputFormat>>,
    /// At most this many results per second, measured on capture times; `null` for no limit.
    #[serde(default)]
    #[schemars(range(min = 0.001))]
    pub rate_limit: Option<f64>,
    /// Send only frames labelled anomalous (frames without a verdict are skipped too).
    #[serde(default)]
    pub only_anomalous: bool,
}

impl DispatchParams {
    /// The rules the schema cannot express: something to send, a positive rate.
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.output_formats.as_ref().is_some_and(Vec::is_empty) {
            return Err(ParamError::new(
                "output_formats",
                "lists nothing to send (use at least one of predictions, image_original, \
                 image_with_predictions)",
            ));
        }
        if let Some(hz) = self.rate_limit
            && !(hz.is_finite() && hz > 0.0)
        {
            return Err(ParamError::new(
                "rate_limit",
                format!("{hz} is not a positive number of results per second"),
            ));
        }
        Ok(())
    }
}

/// A sink's dispatch decisions: which results go out and what they carry.
pub struct Dispatch {
    formats: Vec<OutputFormat>,
    only_anomalous: bool,
    limiter: Option<RateLimiter>,
}

impl Dispatch {
    /// Checks the settings; `default_formats` apply when `output_formats` is not given.
    pub fn new(params: DispatchParams, default_formats: &[OutputFormat]) -> Result<Self, OpError> {
        params.validate()?;
        Ok(Self {
            formats: params
                .output_formats
                .unwrap_or_else(|| default_formats.to_vec()),
            only_anomalous: params.only_anomalous,
            limiter: params.rate_limit.map(RateLimiter::new),
        })
    }

    /// Whether messages carry `format`.
    pub fn wants(&self, format: OutputFormat) -> bool {
        self.formats.contains(&format)
    }

    /// Whether `packet` goes out; a result left out is counted in `health`.
    pub fn admit(&mut self, packet: &Packet, health: &EndpointHealth) -> bool {
        let anomalous = packet.prediction.as_ref().is_some_and(|p| p.anomalous);
        let admitted = (!self.only_anomalous || anomalous)
            && self
                .limiter
                .as_mut()
                .is_none_or(|limiter| limiter.admit(packet.frame.capture.instant));
        if !admitted {
            health.count_skipped();
        }
        admitted
    }

    /// The message for `packet` with the given images (each sink encodes or stores them its own
    /// way), its prediction when asked for, and the latency from capture until now.
    pub fn message(&self, pipeline: &str, packet: &Packet, images: Images) -> PredictionMessage {
        let frame = &packet.frame;
        let capture_unix_ms = frame.capture.unix_ms();
        PredictionMessage {
            timestamp: rfc3339_utc(capture_unix_ms),
            capture_unix_ms,
            pipeline: pipeline.to_string(),
            stream: frame.stream_id.to_string(),
            sequence: frame.sequence,
            width: frame.layout.width,
            height: frame.layout.height,
            prediction: packet
                .prediction
                .as_ref()
                .filter(|_| self.wants(OutputFormat::Predictions))
                .map(|p| PredictionPart {
                    score: p.score,
                    raw_score: p.raw_score,
                    label: p.label(),
                    anomalous: p.anomalous,
                    threshold: p.threshold,
                    model: p.model.to_string(),
                }),
            latency_ms: Latency {
                capture_to_result: frame.capture.instant.elapsed().as_secs_f64() * 1000.0,
            },
            images,
        }
    }
}

/// Lets through at most `hz` results per second of capture time, evenly: after a result at `t`
/// the next one may be captured from `t + 1/hz` on (half a millisecond early still counts, so a
/// 30 FPS camera limited to 5 Hz sends exactly every sixth frame). The schedule advances by whole
/// intervals, so the long-run rate is exact when frames come faster than the limit.
pub struct RateLimiter {
    interval: Duration,
    next: Option<Instant>,
}

impl RateLimiter {
    const GRACE: Duration = Duration::from_micros(500);

    /// A limiter for `hz` results per second (`hz` > 0).
    pub fn new(hz: f64) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / hz),
            next: None,
        }
    }

    /// Whether a result captured at `at` may go out (and if so, counts it).
    pub fn admit(&mut self, at: Instant) -> bool {
        match self.next {
            Some(next) if at + Self::GRACE < next => false,
            Some(next) => {
                let on_schedule = next + self.interval;
                self.next = Some(if at < on_schedule {
                    on_schedule
                } else {
                    at + self.interval
                });
                true
            }
            None => {
                self.next = Some(at + self.interval);
                true
            }
        }
    }
}

/// One result as it leaves the engine.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "inspectflow prediction message",
    description = "One result of an inspectflow pipeline, as sinks send or write it: an MQTT payload, a webhook body, a line of sink.folder's index."
)]
pub struct PredictionMessage {
    /// Capture time of the frame, RFC 3339 in UTC with milliseconds.
    pub timestamp: String,
    /// Capture time in milliseconds since the Unix epoch.
    pub capture_unix_ms: u64,
    /// The pipeline's name.
    pub pipeline: String,
    /// The stream (camera) the frame came from.
    pub stream: String,
    /// The frame's sequence number in its stream, from 0.
    pub sequence: u64,
    /// Frame width in pixels.
    pub width: u32,
    /// Frame height in pixels.
    pub height: u32,
    /// The verdict, when `predictions` is among the output formats and an `anomaly` operator ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<PredictionPart>,
    /// Latencies in milliseconds.
    pub latency_ms: Latency,
    /// The images asked for by the output formats.
    #[serde(default, skip_serializing_if = "Images::is_empty")]
    pub images: Images,
}

/// The verdict part of a message.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictionPart {
    /// Normalised anomaly score in [0, 1].
    pub score: f32,
    /// The model's raw score.
    pub raw_score: f32,
    /// `Anomalous` when `score >= threshold`, else `Normal`.
    pub label: Label,
    /// Whether the label is `Anomalous`.
    pub anomalous: bool,
    /// The normalised score from which a frame counts as anomalous.
    pub threshold: f32,
    /// Id of the model package that decided.
    pub model: String,
}

/// Latencies of a message.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    /// From the frame's capture to the message being built by the sink.
    pub capture_to_result: f64,
}

/// The images of a message.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Images {
    /// The frame as captured (output format `image_original`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<ImagePart>,
    /// The heatmap overlay, or the frame when no heatmap ran (`image_with_predictions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with_predictions: Option<ImagePart>,
}

impl Images {
    /// No image at all.
    pub fn is_empty(&self) -> bool {
        self.original.is_none() && self.with_predictions.is_none()
    }
}

/// One image of a message: inline (network sinks) or as a file next to the index (folder sink).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImagePart {
    /// `jpeg` or `png`.
    pub format: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The encoded image, base64 (standard alphabet, padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The image file's name, relative to the folder of the index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// Encodes the images a message asks for as inline JPEG (for the network sinks).
pub struct InlineImages {
    jpeg: JpegEncoder,
}

impl InlineImages {
    /// A JPEG encoder at `quality`.
    pub fn new(quality: u8) -> Result<Self, OpError> {
        Ok(Self {
            jpeg: JpegEncoder::new(EncodeParams {
                quality,
                source: EncodeSource::Frame,
            })?,
        })
    }

    /// The images of `packet` that `dispatch` asks for, JPEG-encoded and base64'd.
    pub fn encode(&mut self, dispatch: &Dispatch, packet: &Packet) -> Result<Images, OpError> {
        let mut images = Images::default();
        if dispatch.wants(OutputFormat::ImageOriginal) {
            images.original = Some(self.inline(&packet.frame)?);
        }
        if dispatch.wants(OutputFormat::ImageWithPredictions) {
            images.with_predictions =
                Some(self.inline(packet.overlay.as_ref().unwrap_or(&packet.frame))?);
        }
        Ok(images)
    }

    fn inline(&mut self, frame: &Frame) -> Result<ImagePart, OpError> {
        let encoded = self.jpeg.encode(frame)?;
        Ok(ImagePart {
            format: "jpeg".into(),
            width: frame.layout.width,
            height: frame.layout.height,
            data: Some(base64::engine::general_purpose::STANDARD.encode(encoded.bytes())),
            file: None,
        })
    }
}

/// `unix_ms` as RFC 3339 in UTC with milliseconds, e.g. `2026-11-30T05:00:00.123Z`.
pub fn rfc3339_utc(unix_ms: u64) -> String {
    let days = (unix_ms / 86_400_000) as i64;
    let of_day = unix_ms % 86_400_000;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3_600_000,
        of_day / 60_000 % 60,
        of_day / 1000 % 60,
        of_day % 1000
    )
}

/// The password a network sink signs in with: read from the environment variable
/// `password_env` names, or `password` as given (checked when the sink is built).
pub fn sign_in_password(
    password: &Option<String>,
    password_env: &Option<String>,
) -> Result<Option<String>, OpError> {
    match (password, password_env) {
        (_, Some(variable)) => crate::secrets::read_password(variable)
            .map(Some)
            .map_err(|message| OpError::param("password_env", message)),
        (password, None) => Ok(password.clone()),
    }
}

/// The rules on a network sink's credentials: one way of giving the password, and a user name
/// with it.
pub fn check_credentials(
    username: &Option<String>,
    password: &Option<String>,
    password_env: &Option<String>,
) -> Result<(), ParamError> {
    if password.is_some() && password_env.is_some() {
        return Err(ParamError::new(
            "password_env",
            "give either password or password_env, not both",
        ));
    }
    if let Some(variable) = password_env {
        crate::secrets::check_variable(variable)
            .map_err(|message| ParamError::new("password_env", message))?;
    }
    if (password.is_some() || password_env.is_some()) && username.is_none() {
        return Err(ParamError::new("username", "a password needs a user name"));
    }
    Ok(())
}

/// Fails naming `tls.ca_file` when a TLS authority file is given but is not a readable file.
pub fn check_ca_file(ca_file: Option<&std::path::PathBuf>) -> Result<(), OpError> {
    match ca_file {
        Some(file) if !file.is_file() => Err(OpError::param(
            "tls.ca_file",
            format!("{} is not a readable file", file.display()),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_utc(1_796_014_800_123), "2026-11-30T05:00:00.123Z");
    }

    #[test]
    fn a_30_fps_stream_limited_to_5_hz_sends_every_sixth_frame() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(5.0);
        let admitted: Vec<usize> = (0..90)
            .filter(|&n| limiter.admit(start + Duration::from_secs_f64(n as f64 / 30.0)))
            .collect();
        assert_eq!(admitted, (0..90).step_by(6).collect::<Vec<_>>());
    }

    #[test]
    fn a_slower_stream_than_the_limit_passes_whole() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(10.0);
        let admitted = (0..50)
            .filter(|&n| limiter.admit(start + Duration::from_millis(250 * n)))
            .count();
        assert_eq!(admitted, 50);
    }

    #[test]
    fn empty_output_formats_and_bad_rates_are_refused_by_name() {
        let no_formats = DispatchParams {
            output_formats: Some(vec![]),
            ..DispatchParams::default()
        };
        let error = Dispatch::new(no_formats, &[OutputFormat::Predictions])
            .err()
            .map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("output_formats")));
        let zero_rate = DispatchParams {
            rate_limit: Some(0.0),
            ..DispatchParams::default()
        };
        let error = Dispatch::new(zero_rate, &[OutputFormat::Predictions])
            .err()
            .map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("rate_limit")));
    }
}
