//! What the V4L2 cameras on this machine are and what they can deliver: each one's name and its
//! modes (pixel format, size, frame rates), from GStreamer's device monitor (the `v4l2` device
//! provider), for `/api/devices`.

use std::str::FromStr;

use gstreamer as gst;
use gstreamer::prelude::*;

/// One way a camera can deliver frames.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct CameraMode {
    /// The pixel format: GStreamer's raw format name (`YUY2`, `NV12`, ...) or `MJPG` for JPEG.
    pub format: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Frame rates as fractions (`30/1`), or a range (`5/1-30/1`).
    pub framerates: Vec<String>,
}

/// A camera the device monitor found.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraDescription {
    /// Its device file (`/dev/video0`).
    pub path: String,
    /// Its name as the driver gives it.
    pub name: String,
    /// What it can deliver.
    pub modes: Vec<CameraMode>,
}

/// The cameras GStreamer's device monitor lists (none when GStreamer is missing).
pub fn describe_cameras() -> Vec<CameraDescription> {
    if super::init().is_err() {
        return Vec::new();
    }
    let monitor = gst::DeviceMonitor::new();
    if monitor.add_filter(Some("Video/Source"), None).is_none() || monitor.start().is_err() {
        return Vec::new();
    }
    let cameras = monitor
        .devices()
        .iter()
        .filter_map(|device| {
            let properties = device.properties()?;
            let path = ["api.v4l2.path", "device.path"]
                .iter()
                .find_map(|key| properties.get::<String>(*key).ok())?;
            Some(CameraDescription {
                path,
                name: device.display_name().to_string(),
                modes: device
                    .caps()
                    .map(|caps| modes_of(&caps))
                    .unwrap_or_default(),
            })
        })
        .collect();
    monitor.stop();
    cameras
}

/// The modes a camera's caps describe: one per format and fixed size, with its frame rates.
/// Structures with a size range (stepwise cameras) are left out.
pub fn modes_of(caps: &gst::CapsRef) -> Vec<CameraMode> {
    let mut modes: Vec<CameraMode> = Vec::new();
    for structure in caps.iter() {
        let formats: Vec<String> = match structure.name().as_str() {
            "image/jpeg" => vec!["MJPG".into()],
            "video/x-raw" => match structure.value("format") {
                Ok(value) => match value.get::<String>() {
                    Ok(format) => vec![format],
                    Err(_) => value
                        .get::<gst::List>()
                        .map(|list| list.iter().filter_map(|v| v.get::<String>().ok()).collect())
                        .unwrap_or_default(),
                },
                Err(_) => Vec::new(),
            },
            other => vec![other.to_string()],
        };
        let (Ok(width), Ok(height)) = (
            structure.get::<i32>("width"),
            structure.get::<i32>("height"),
        ) else {
            continue;
        };
        let framerates = match structure.value("framerate") {
            Ok(value) => framerates_of(value),
            Err(_) => Vec::new(),
        };
        for format in formats {
            let mode = CameraMode {
                format,
                width: width.max(0) as u32,
                height: height.max(0) as u32,
                framerates: framerates.clone(),
            };
            if !modes.contains(&mode) {
                modes.push(mode);
            }
        }
    }
    modes
}

fn framerates_of(value: &gst::glib::SendValue) -> Vec<String> {
    let text = |fraction: gst::Fraction| format!("{}/{}", fraction.numer(), fraction.denom());
    if let Ok(fraction) = value.get::<gst::Fraction>() {
        return vec![text(fraction)];
    }
    if let Ok(list) = value.get::<gst::List>() {
        return list
            .iter()
            .filter_map(|v| v.get::<gst::Fraction>().ok())
            .map(text)
            .collect();
    }
    if let Ok(range) = value.get::<gst::FractionRange>() {
        return vec![format!("{}-{}", text(range.min()), text(range.max()))];
    }
    Vec::new()
}

/// Caps from their text form (for tests and tools).
pub fn caps_from_text(text: &str) -> Option<gst::Caps> {
    super::init().ok()?;
    gst::Caps::from_str(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_come_from_each_format_size_and_frame_rate_of_the_caps() {
        let caps = caps_from_text(
            "video/x-raw, format=(string)YUY2, width=(int)640, height=(int)480, framerate=(fraction){ 30/1, 15/1 }; \
             video/x-raw, format=(string){ NV12, YUY2 }, width=(int)1280, height=(int)720, framerate=(fraction)[ 5/1, 10/1 ]; \
             image/jpeg, width=(int)1920, height=(int)1080, framerate=(fraction)30/1; \
             video/x-raw, format=(string)YUY2, width=(int)[ 16, 4096 ], height=(int)[ 16, 2160 ]",
        )
        .expect("caps parse");
        let modes = modes_of(&caps);
        let summary: Vec<String> = modes
            .iter()
            .map(|m| {
                format!(
                    "{} {}x{} {}",
                    m.format,
                    m.width,
                    m.height,
                    m.framerates.join(",")
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                "YUY2 640x480 30/1,15/1",
                "NV12 1280x720 5/1-10/1",
                "YUY2 1280x720 5/1-10/1",
                "MJPG 1920x1080 30/1",
            ]
        );
    }
}
