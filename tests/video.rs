//! Video in with GStreamer: files decoded frame-exactly, an RTSP camera that drops and comes back,
//! a watched images folder, and bad input (corrupt files, non-images, unreachable cameras).
//!
//! Everything runs against real GStreamer: the MP4 is written by x264enc and mp4mux, the camera
//! is a gst-rtsp-server on 127.0.0.1.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{graph_from_yaml, registry_with_probe, run_to_end, seen_by};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_rtsp_server as rtsp;
use gstreamer_rtsp_server::prelude::*;
use inspectflow::operators::{Frame, PixelFormat};
use inspectflow::runtime::Pipeline;

const LIMIT: Duration = Duration::from_secs(120);
const WIDTH: usize = 320;
const HEIGHT: usize = 240;
/// Frame numbers are written as this many black or white vertical bars.
const BITS: usize = 8;

/// Luma of a frame showing `number` as bars (most significant bit left).
fn numbered_luma(number: usize) -> Vec<u8> {
    let mut luma = vec![0u8; WIDTH * HEIGHT];
    for (index, value) in luma.iter_mut().enumerate() {
        let bit = (index % WIDTH) * BITS / WIDTH;
        *value = if number >> (BITS - 1 - bit) & 1 == 1 {
            235
        } else {
            16
        };
    }
    luma
}

/// Reads the number back from a decoded frame (I420 or RGB).
fn read_number(frame: &Frame) -> usize {
    let row = HEIGHT / 2;
    (0..BITS).fold(0, |number, bit| {
        let x = bit * WIDTH / BITS + WIDTH / (2 * BITS);
        let value = match frame.layout.format {
            PixelFormat::I420 | PixelFormat::Gray => frame.pixels()[row * frame.layout.stride + x],
            _ => frame.pixels()[row * frame.layout.stride + x * 3],
        };
        (number << 1) | usize::from(value > 128)
    })
}

/// Writes `frames` numbered frames as H.264 in MP4 with GStreamer's own encoder.
fn write_numbered_mp4(path: &Path, frames: usize) {
    gst::init().expect("GStreamer initialises");
    let pipeline = gst::parse::launch(&format!(
        "appsrc name=src format=time ! videoconvert ! x264enc speed-preset=ultrafast key-int-max=15 \
         ! h264parse ! mp4mux ! filesink location={}",
        path.display()
    ))
    .expect("encoding pipeline")
    .downcast::<gst::Pipeline>()
    .expect("a pipeline");
    let appsrc = pipeline
        .by_name("src")
        .expect("appsrc")
        .downcast::<gst_app::AppSrc>()
        .expect("an appsrc");
    appsrc.set_caps(Some(
        &gst::Caps::builder("video/x-raw")
            .field("format", "I420")
            .field("width", WIDTH as i32)
            .field("height", HEIGHT as i32)
            .field("framerate", gst::Fraction::new(30, 1))
            .build(),
    ));
    pipeline.set_state(gst::State::Playing).expect("plays");
    for number in 0..frames {
        let mut bytes = numbered_luma(number);
        bytes.resize(WIDTH * HEIGHT * 3 / 2, 128);
        let mut buffer = gst::Buffer::from_mut_slice(bytes);
        {
            let buffer = buffer.get_mut().expect("unique buffer");
            buffer.set_pts(gst::ClockTime::from_mseconds(number as u64 * 1000 / 30));
            buffer.set_duration(gst::ClockTime::from_mseconds(33));
        }
        appsrc.push_buffer(buffer).expect("pushed");
    }
    appsrc.end_of_stream().expect("end of stream");
    let bus = pipeline.bus().expect("bus");
    let message = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(60),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("encoding finishes");
    assert!(
        matches!(message.view(), gst::MessageView::Eos(_)),
        "encoding failed: {message:?}"
    );
    pipeline.set_state(gst::State::Null).expect("stops");
}

#[test]
fn a_video_file_under_block_delivers_every_frame_once_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let video = dir.path().join("numbered.mp4");
    write_numbered_mp4(&video, 90);
    let (registry, recordings) = registry_with_probe();
    let yaml = format!(
        r#"
nodes:
  - {{id: video, op: source.video_file, params: {{path: "{}"}}}}
  - {{id: slow, op: identity, params: {{sleep_ms: 3}}}}
  - {{id: probe, op: test.probe, params: {{keep_frames: true}}}}
edges:
  - {{from: video, to: slow, queue: {{capacity: 2}}}}
  - {{from: slow, to: probe, queue: {{capacity: 2}}}}
"#,
        video.display()
    );
    let outcome = run_to_end(&graph_from_yaml(&registry, &yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    assert_eq!(
        outcome.report.state, "completed",
        "end of file ends the run"
    );
    let seen = seen_by(&recordings, "probe");
    let sequences: Vec<u64> = seen.iter().map(|s| s.sequence).collect();
    assert_eq!(sequences, (0..90).collect::<Vec<u64>>());
    let numbers: Vec<usize> = seen.iter().map(|s| read_number(s.kept_frame())).collect();
    assert_eq!(
        numbers,
        (0..90).collect::<Vec<usize>>(),
        "every frame once, in order"
    );
    let first = seen[0].kept_frame();
    assert_eq!(first.layout.format, PixelFormat::I420);
    assert_eq!((first.layout.width, first.layout.height), (320, 240));
    assert!(outcome.report.edges.iter().all(|edge| edge.dropped == 0));
}

/// A file played in real time follows its clock like a camera, but loses no frame before the
/// graph sees it: every frame is delivered or dropped on a `drop_oldest` edge, where it is
/// counted. A slow stage makes the edge drop.
#[test]
fn a_file_played_in_real_time_delivers_or_counts_every_frame() {
    let dir = tempfile::tempdir().expect("temp dir");
    let video = dir.path().join("numbered.mp4");
    write_numbered_mp4(&video, 60);
    let (registry, recordings) = registry_with_probe();
    let yaml = format!(
        r#"
nodes:
  - {{id: video, op: source.video_file, params: {{path: "{}", realtime: true}}}}
  - {{id: slow, op: identity, params: {{sleep_ms: 70}}}}
  - {{id: probe, op: test.probe, params: {{keep_frames: true}}}}
edges:
  - {{from: video, to: slow, queue: {{capacity: 1}}}}
  - {{from: slow, to: probe, queue: {{capacity: 8}}}}
"#,
        video.display()
    );
    let started = std::time::Instant::now();
    let outcome = run_to_end(&graph_from_yaml(&registry, &yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "60 frames at 30 FPS take two seconds in real time"
    );
    let numbers: Vec<usize> = seen_by(&recordings, "probe")
        .iter()
        .map(|s| read_number(s.kept_frame()))
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "in order: {numbers:?}"
    );
    let dropped: u64 = outcome.report.edges.iter().map(|edge| edge.dropped).sum();
    assert!(dropped > 0, "the slow stage made the edge drop");
    assert_eq!(
        numbers.len() as u64 + dropped,
        60,
        "delivered {numbers:?}, dropped {dropped}"
    );
}

/// A file played in real time starts its clock when the graph runs, not when the source is
/// built: a node that takes half a second to build (a model compiling) used to leave the first
/// frames to come all at once, late, and wait in the queues.
#[test]
fn a_file_played_in_real_time_paces_its_first_frames_after_a_slow_build() {
    let dir = tempfile::tempdir().expect("temp dir");
    let video = dir.path().join("numbered.mp4");
    write_numbered_mp4(&video, 30);
    let (mut registry, recordings) = registry_with_probe();
    common::register_pass_on(
        &mut registry,
        "test.slow_to_build",
        "Takes half a second to build, then passes packets on.",
        |_| std::thread::sleep(Duration::from_millis(500)),
    );
    let yaml = format!(
        r#"
nodes:
  - {{id: video, op: source.video_file, params: {{path: "{}", realtime: true}}}}
  - {{id: model, op: test.slow_to_build}}
  - {{id: probe, op: test.probe, params: {{keep_frames: true}}}}
edges:
  - {{from: video, to: model, queue: {{capacity: 32, policy: block}}}}
  - {{from: model, to: probe, queue: {{capacity: 32, policy: block}}}}
"#,
        video.display()
    );
    let outcome = run_to_end(&graph_from_yaml(&registry, &yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let seen = seen_by(&recordings, "probe");
    assert_eq!(seen.len(), 30, "every frame arrives");
    let captured: Vec<Instant> = seen
        .iter()
        .map(|s| s.kept_frame().capture.instant)
        .collect();
    // Ten frames at 30 FPS span 300 ms; a burst spans a few.
    let first_ten = captured[9].duration_since(captured[0]);
    assert!(
        first_ten >= Duration::from_millis(200),
        "the first ten frames were captured within {first_ten:?}: a burst, not 30 FPS"
    );
}

#[test]
fn a_looping_file_in_rgb_goes_round_and_keeps_numbering_frames() {
    let dir = tempfile::tempdir().expect("temp dir");
    let video = dir.path().join("short.mp4");
    write_numbered_mp4(&video, 10);
    let (registry, recordings) = registry_with_probe();
    let yaml = format!(
        r#"
nodes:
  - {{id: video, op: source.video_file, params: {{path: "{}", loop: true, format: rgb}}}}
  - {{id: probe, op: test.probe, params: {{keep_frames: true}}}}
edges:
  - {{from: video, to: probe}}
"#,
        video.display()
    );
    let pipeline = Pipeline::start(&graph_from_yaml(&registry, &yaml)).expect("starts");
    let started = Instant::now();
    while seen_by(&recordings, "probe").len() < 25 {
        assert!(started.elapsed() < LIMIT, "looping stalled");
        assert!(!pipeline.is_finished(), "a looping file never ends");
        std::thread::sleep(Duration::from_millis(20));
    }
    pipeline.stop_handle().stop();
    let outcome = pipeline.wait();
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let seen = seen_by(&recordings, "probe");
    assert_eq!(seen[0].kept_frame().layout.format, PixelFormat::Rgb);
    for (index, seen) in seen.iter().enumerate().take(25) {
        assert_eq!(seen.sequence, index as u64);
        assert_eq!(read_number(seen.kept_frame()), index % 10, "frame {index}");
    }
}

/// A gst-rtsp-server on 127.0.0.1 serving a live H.264 test picture at `/cam`.
struct RtspServer {
    main_loop: gst::glib::MainLoop,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RtspServer {
    fn start(port: u16) -> Self {
        gst::init().expect("GStreamer initialises");
        let context = gst::glib::MainContext::new();
        let main_loop = gst::glib::MainLoop::new(Some(&context), false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let main_loop = main_loop.clone();
            std::thread::spawn(move || {
                context
                    .with_thread_default(|| {
                        let server = rtsp::RTSPServer::new();
                        server.set_address("127.0.0.1");
                        server.set_service(&port.to_string());
                        let factory = rtsp::RTSPMediaFactory::new();
                        factory.set_launch(
                            "( videotestsrc is-live=true pattern=ball \
                             ! video/x-raw,width=320,height=240,framerate=15/1 \
                             ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 \
                             ! rtph264pay name=pay0 pt=96 )",
                        );
                        factory.set_shared(true);
                        server
                            .mount_points()
                            .expect("mount points")
                            .add_factory("/cam", factory);
                        let source = server
                            .attach(Some(&context))
                            .expect("RTSP server binds its port");
                        ready_tx.send(()).expect("signal ready");
                        main_loop.run();
                        // Going down like a camera that loses power: clients cut, port closed.
                        server.client_filter(Some(&mut |_, _| rtsp::RTSPFilterResult::Remove));
                        if let Some(listener) = context.find_source_by_id(&source) {
                            listener.destroy();
                        }
                    })
                    .expect("thread-default context");
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("RTSP server started");
        Self {
            main_loop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.main_loop.quit();
        if let Some(thread) = self.thread.take() {
            thread.join().expect("RTSP server thread");
        }
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Waits (bounded) until `condition` holds.
fn wait_for(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_rtsp_camera_that_drops_is_shown_offline_and_flows_again_without_a_restart() {
    let port = free_port();
    let server = RtspServer::start(port);
    let (registry, recordings) = registry_with_probe();
    let yaml = format!(
        r#"
nodes:
  - id: camera
    op: source.ip_camera
    params:
      url: "rtsp://operator:s3cret@127.0.0.1:{port}/cam"
      latency_ms: 50
      reconnect: {{initial_backoff_ms: 200, max_backoff_ms: 1000, stall_timeout_ms: 1500}}
  - {{id: probe, op: test.probe, params: {{keep_frames: true}}}}
edges:
  - {{from: camera, to: probe}}
"#
    );
    let pipeline = Pipeline::start(&graph_from_yaml(&registry, &yaml)).expect("starts");
    let frames = || seen_by(&recordings, "probe").len();
    wait_for("the first frames", LIMIT, || frames() >= 10);
    let camera = |pipeline: &Pipeline| pipeline.report().node("camera").cloned().expect("node");
    let source = camera(&pipeline).source.expect("source state");
    assert_eq!((source.state.as_str(), source.outages), ("online", 0));

    server.stop();
    wait_for("the camera to show offline", LIMIT, || {
        camera(&pipeline)
            .source
            .is_some_and(|s| s.state == "offline")
    });
    let offline = camera(&pipeline).source.expect("source state");
    assert_eq!(offline.outages, 1);
    let reason = offline.last_error.expect("a reason");
    assert!(!reason.contains("s3cret"), "credentials leaked: {reason}");
    assert!(!pipeline.is_finished(), "the graph stays up");
    std::thread::sleep(Duration::from_millis(1500)); // a few failed reconnects
    let before = frames();

    let _server = RtspServer::start(port);
    wait_for("frames to flow again", LIMIT, || frames() >= before + 10);
    let back = camera(&pipeline).source.expect("source state");
    assert_eq!(back.state, "online");
    assert_eq!(
        back.outages, 1,
        "one outage, however many reconnect attempts"
    );
    let metrics = pipeline.report().to_prometheus();
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("inspectflow_source_outages_total{")
                && line.contains("node=\"camera\"")
                && line.ends_with("} 1")),
        "{metrics}"
    );
    assert!(!metrics.contains("s3cret"));

    pipeline.stop_handle().stop();
    let outcome = pipeline.wait();
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let sequences: Vec<u64> = seen_by(&recordings, "probe")
        .iter()
        .map(|s| s.sequence)
        .collect();
    assert!(
        sequences.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "sequence numbers continue across the outage"
    );
}

#[test]
fn a_camera_faster_than_its_graph_keeps_the_newest_frames_and_counts_the_rest() {
    let port = free_port();
    let _server = RtspServer::start(port);
    let (registry, recordings) = registry_with_probe();
    // 15 FPS into a consumer that takes 200 ms a frame and a queue that holds one: the source
    // waits on the queue, so its appsink lets frames go.
    let yaml = format!(
        r#"
nodes:
  - id: camera
    op: source.ip_camera
    params: {{url: "rtsp://127.0.0.1:{port}/cam", latency_ms: 50}}
  - {{id: probe, op: test.probe, params: {{sleep_ms: 200}}}}
edges:
  - {{from: camera, to: probe, queue: {{policy: block, capacity: 1}}}}
"#
    );
    let pipeline = Pipeline::start(&graph_from_yaml(&registry, &yaml)).expect("starts");
    wait_for("frames through the slow consumer", LIMIT, || {
        seen_by(&recordings, "probe").len() >= 8
    });
    let report = pipeline.report();
    pipeline.stop_handle().stop();
    let outcome = pipeline.wait();
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);

    let camera = report.node("camera").expect("camera node");
    let dropped = camera.source.as_ref().expect("source state").dropped;
    let taken = camera.packets_out;
    assert!(
        dropped > taken,
        "a consumer at a third of the camera's rate lets most frames go: {dropped} let go, {taken} taken"
    );
    let table = report.to_table();
    assert!(
        table
            .lines()
            .any(|line| line.starts_with("camera ") && line.contains(&format!(" {dropped} "))),
        "the table shows them in the camera's row:\n{table}"
    );
    assert!(
        report.to_prometheus().lines().any(|line| {
            line.starts_with("inspectflow_source_dropped_total{")
                && line.contains("node=\"camera\"")
                && line.ends_with(&format!("}} {dropped}"))
        }),
        "{}",
        report.to_prometheus()
    );
    let sequences: Vec<u64> = seen_by(&recordings, "probe")
        .iter()
        .map(|s| s.sequence)
        .collect();
    assert!(
        sequences.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "frames the graph took keep consecutive numbers: {sequences:?}"
    );
}

#[test]
fn an_unreachable_camera_is_offline_and_the_graph_stays_up() {
    let (registry, _) = registry_with_probe();
    let port = free_port(); // nothing listens there
    let yaml = format!(
        r#"
nodes:
  - id: camera
    op: source.ip_camera
    params:
      url: "rtsp://127.0.0.1:{port}/none"
      reconnect: {{initial_backoff_ms: 100, max_backoff_ms: 400}}
  - id: mjpeg
    op: source.ip_camera
    params: {{url: "http://127.0.0.1:{port}/mjpeg", reconnect: {{initial_backoff_ms: 100}}}}
  - {{id: usb, op: source.usb_camera, params: {{device: /dev/video99}}}}
  - {{id: probe, op: test.probe, params: {{keep_frames: true}}}}
edges:
  - {{from: camera, to: probe}}
  - {{from: mjpeg, to: probe}}
  - {{from: usb, to: probe}}
"#
    );
    let pipeline = Pipeline::start(&graph_from_yaml(&registry, &yaml)).expect("starts");
    for node in ["camera", "mjpeg", "usb"] {
        wait_for(&format!("{node} to show offline"), LIMIT, || {
            pipeline
                .report()
                .node(node)
                .and_then(|n| n.source.clone())
                .is_some_and(|s| s.state == "offline" && s.last_error.is_some())
        });
    }
    let report = pipeline.report();
    let usb = report
        .node("usb")
        .and_then(|n| n.source.clone())
        .expect("usb");
    assert!(
        usb.last_error
            .as_deref()
            .is_some_and(|e| e.contains("/dev/video99")),
        "{usb:?}"
    );
    assert!(
        !pipeline.is_finished(),
        "unreachable cameras do not end the graph"
    );
    assert_eq!(report.state, "running");
    let stopping = Instant::now();
    pipeline.stop_handle().stop();
    let outcome = pipeline.wait();
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    assert!(
        stopping.elapsed() < Duration::from_secs(30),
        "stopping hangs"
    );
}

#[test]
fn corrupt_and_missing_video_files_give_errors_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (registry, _) = registry_with_probe();
    let garbage = dir.path().join("garbage.mp4");
    std::fs::write(&garbage, vec![0x5au8; 100_000]).expect("write");
    let truncated = dir.path().join("truncated.mp4");
    let whole = dir.path().join("whole.mp4");
    write_numbered_mp4(&whole, 30);
    let bytes = std::fs::read(&whole).expect("read");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).expect("write");

    for path in [&garbage, &truncated] {
        let yaml = format!(
            "nodes:\n  - {{id: video, op: source.video_file, params: {{path: \"{}\"}}}}\n  - {{id: probe, op: test.probe, params: {{keep_frames: true}}}}\nedges:\n  - {{from: video, to: probe}}\n",
            path.display()
        );
        let graph = graph_from_yaml(&registry, &yaml);
        let message = match Pipeline::start(&graph) {
            Err(error) => error.to_string(),
            Ok(pipeline) => {
                let started = Instant::now();
                while !pipeline.is_finished() {
                    assert!(started.elapsed() < LIMIT, "{} hangs", path.display());
                    std::thread::sleep(Duration::from_millis(10));
                }
                match pipeline.wait().failure {
                    Some(failure) => failure.to_string(),
                    // A truncated MP4 may decode up to where it was cut: that is not an error.
                    None => {
                        assert_eq!(path, &truncated, "garbage decoded without error");
                        continue;
                    }
                }
            }
        };
        assert!(message.contains("video"), "names the node: {message}");
        assert!(
            message.contains(&*path.file_name().expect("name").to_string_lossy()),
            "names the file: {message}"
        );
    }

    let missing = format!(
        "nodes:\n  - {{id: video, op: source.video_file, params: {{path: \"{}\"}}}}\n  - {{id: probe, op: test.probe, params: {{keep_frames: true}}}}\nedges:\n  - {{from: video, to: probe}}\n",
        dir.path().join("missing.mp4").display()
    );
    let error = Pipeline::start(&graph_from_yaml(&registry, &missing))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("'path'") && error.contains("missing.mp4"),
        "{error}"
    );
}

/// A 32x24 PNG of one flat colour.
fn flat_png(level: u8) -> Vec<u8> {
    flat_png_sized(level, 32, 24)
}

/// A PNG of one flat colour and the given size.
fn flat_png_sized(level: u8, width: u32, height: u32) -> Vec<u8> {
    let mut encoded = Vec::new();
    let mut encoder = png::Encoder::new(&mut encoded, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().expect("header");
    writer
        .write_image_data(&vec![level; (width * height * 3) as usize])
        .expect("pixels");
    writer.finish().expect("finish");
    encoded
}

#[test]
fn images_dropped_into_a_watched_folder_are_each_processed_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let folder = dir.path();
    std::fs::write(folder.join("a-existing.png"), flat_png(10)).expect("write");
    std::fs::write(folder.join("b-existing.png"), flat_png(20)).expect("write");
    std::fs::write(folder.join("notes.txt"), "not an image").expect("write");
    let (registry, recordings) = registry_with_probe();
    let yaml = format!(
        r#"
nodes:
  - id: folder
    op: source.images_folder
    params: {{path: "{}", poll_interval_ms: 50, settle_ms: 300, incomplete_timeout_ms: 1500}}
  - {{id: probe, op: test.probe, params: {{keep_frames: true}}}}
edges:
  - {{from: folder, to: probe}}
"#,
        folder.display()
    );
    let pipeline = Pipeline::start(&graph_from_yaml(&registry, &yaml)).expect("starts");
    let levels = || -> Vec<u8> {
        seen_by(&recordings, "probe")
            .iter()
            .map(|s| s.kept_frame().pixels()[0])
            .collect()
    };
    wait_for("the existing images", LIMIT, || levels().len() >= 2);
    assert_eq!(levels(), vec![10, 20], "existing images first, by name");

    // Written whole.
    std::fs::write(folder.join("c-new.png"), flat_png(30)).expect("write");
    // Written under a hidden name, then renamed.
    std::fs::write(folder.join(".d-new.png.tmp"), flat_png(40)).expect("write");
    std::fs::rename(folder.join(".d-new.png.tmp"), folder.join("d-new.png")).expect("rename");
    // Not an image although named like one.
    std::fs::write(folder.join("broken.png"), b"this is not a PNG at all").expect("write");
    // Written slowly: half, a pause longer than the settle time, the rest.
    let slow = flat_png(50);
    {
        use std::io::Write;
        let mut file = std::fs::File::create(folder.join("e-slow.png")).expect("create");
        file.write_all(&slow[..slow.len() / 2]).expect("first half");
        file.flush().expect("flush");
        std::thread::sleep(Duration::from_millis(900));
        file.write_all(&slow[slow.len() / 2..])
            .expect("second half");
    }
    wait_for("the new images", LIMIT, || levels().len() >= 5);
    // Time for a duplicate or the broken file to show up, if they were going to.
    std::thread::sleep(Duration::from_millis(2000));
    let mut seen = levels();
    seen.sort();
    assert_eq!(
        seen,
        vec![10, 20, 30, 40, 50],
        "each image once, none half-read"
    );
    assert!(!pipeline.is_finished(), "a watched folder never ends");
    pipeline.stop_handle().stop();
    let outcome = pipeline.wait();
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
}

#[test]
fn a_folder_read_without_watching_ends_after_its_images() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (index, level) in [5u8, 6, 7].iter().enumerate() {
        std::fs::write(dir.path().join(format!("{index}.png")), flat_png(*level)).expect("write");
    }
    let (registry, recordings) = registry_with_probe();
    let yaml = format!(
        "nodes:\n  - {{id: folder, op: source.images_folder, params: {{path: \"{}\", watch: false, settle_ms: 0}}}}\n  - {{id: probe, op: test.probe, params: {{keep_frames: true}}}}\nedges:\n  - {{from: folder, to: probe}}\n",
        dir.path().display()
    );
    let outcome = run_to_end(&graph_from_yaml(&registry, &yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let levels: Vec<u8> = seen_by(&recordings, "probe")
        .iter()
        .map(|s| s.kept_frame().pixels()[0])
        .collect();
    assert_eq!(levels, vec![5, 6, 7]);
}

/// NAL unit types in an Annex B byte stream.
fn nal_types(bytes: &[u8]) -> Vec<u8> {
    nal_units(bytes).map(|unit| unit[0] & 0x1f).collect()
}

/// The NAL units of an Annex B byte stream (each starting at its header byte).
fn nal_units(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let starts: Vec<usize> = (0..bytes.len().saturating_sub(3))
        .filter(|&i| bytes[i..i + 3] == [0, 0, 1])
        .map(|i| i + 3)
        .collect();
    let ends: Vec<usize> = starts
        .iter()
        .skip(1)
        .map(|&next| next - 3)
        .chain([bytes.len()])
        .collect();
    starts
        .into_iter()
        .zip(ends)
        .map(move |(start, end)| &bytes[start..end])
}

#[test]
fn encode_h264_attaches_one_access_unit_per_frame_with_parameter_sets_at_key_frames() {
    let (registry, recordings) = registry_with_probe();
    let yaml = r#"
nodes:
  - {id: camera, op: source.synthetic, params: {width: 320, height: 240, frames: 40}}
  - {id: h264, op: encode.h264, params: {keyframe_interval: 15, preset: ultrafast}}
  - {id: probe, op: test.probe, params: {keep_frames: true}}
edges:
  - {from: camera, to: h264}
  - {from: h264, to: probe}
"#;
    let outcome = run_to_end(&graph_from_yaml(&registry, yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let seen = seen_by(&recordings, "probe");
    assert_eq!(seen.len(), 40);
    let mut key_frames = 0;
    for (index, packet) in seen.iter().enumerate() {
        let (format, bytes) = packet.encoded.as_ref().expect("every packet is encoded");
        assert_eq!(*format, "h264");
        let types = nal_types(bytes);
        assert!(
            types.iter().any(|t| *t == 1 || *t == 5),
            "frame {index}: {types:?}"
        );
        if types.contains(&5) {
            key_frames += 1;
            assert!(
                types.contains(&7) && types.contains(&8),
                "SPS and PPS before key frame {index}"
            );
        }
    }
    let first = &seen[0].encoded.as_ref().expect("first").1;
    assert!(nal_types(first).contains(&5), "starts on a key frame");
    // The synthetic frames are RGB; x264 must still get 8-bit 4:2:0, which every player and
    // browser decodes (profile_idc 66 baseline, 77 main or 100 high; not 244, High 4:4:4).
    let sps = nal_units(first)
        .find(|unit| unit[0] & 0x1f == 7)
        .expect("an SPS");
    assert!(
        [66, 77, 100].contains(&sps[1]),
        "profile_idc {} is not a 4:2:0 8-bit profile",
        sps[1]
    );
    assert_eq!(key_frames, 3, "a key frame every 15 frames");
}

#[test]
fn sink_video_file_records_an_mp4_that_reads_back_frame_for_frame() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("numbered.mp4");
    write_numbered_mp4(&input, 45);
    let recording = dir.path().join("recording.mp4");
    let (registry, recordings) = registry_with_probe();
    let record = format!(
        r#"
nodes:
  - {{id: video, op: source.video_file, params: {{path: "{}"}}}}
  - {{id: record, op: sink.video_file, params: {{path: "{}", bitrate_kbps: 2000}}}}
edges:
  - {{from: video, to: record}}
"#,
        input.display(),
        recording.display()
    );
    let outcome = run_to_end(&graph_from_yaml(&registry, &record), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    assert!(
        recording.is_file(),
        "the recording is complete under its name"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "no partial file left behind");

    let read_back = format!(
        "nodes:\n  - {{id: video, op: source.video_file, params: {{path: \"{}\"}}}}\n  - {{id: probe, op: test.probe, params: {{keep_frames: true}}}}\nedges:\n  - {{from: video, to: probe}}\n",
        recording.display()
    );
    let outcome = run_to_end(&graph_from_yaml(&registry, &read_back), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let numbers: Vec<usize> = seen_by(&recordings, "probe")
        .iter()
        .map(|s| read_number(s.kept_frame()))
        .collect();
    assert_eq!(numbers, (0..45).collect::<Vec<usize>>());

    // An existing file is not overwritten unless asked.
    let error = Pipeline::start(&graph_from_yaml(&registry, &record))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("record") && error.contains("overwrite"),
        "{error}"
    );
}

#[test]
fn images_of_odd_size_are_recorded_with_their_last_column_and_row_cropped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let paths: Vec<String> = (0..3u8)
        .map(|i| {
            let path = dir.path().join(format!("{i}.png"));
            std::fs::write(&path, flat_png_sized(40 + 60 * i, 65, 49)).expect("write png");
            format!("\"{}\"", path.display())
        })
        .collect();
    let recording = dir.path().join("odd.mp4");
    let (registry, recordings) = registry_with_probe();
    let record = format!(
        "nodes:\n  - {{id: images, op: source.files, params: {{paths: [{}]}}}}\n  - {{id: record, op: sink.video_file, params: {{path: \"{}\"}}}}\nedges:\n  - {{from: images, to: record}}\n",
        paths.join(", "),
        recording.display()
    );
    let outcome = run_to_end(&graph_from_yaml(&registry, &record), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let read_back = format!(
        "nodes:\n  - {{id: video, op: source.video_file, params: {{path: \"{}\"}}}}\n  - {{id: probe, op: test.probe, params: {{keep_frames: true}}}}\nedges:\n  - {{from: video, to: probe}}\n",
        recording.display()
    );
    let outcome = run_to_end(&graph_from_yaml(&registry, &read_back), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let sizes: Vec<(u32, u32)> = seen_by(&recordings, "probe")
        .iter()
        .map(|s| (s.kept_frame().layout.width, s.kept_frame().layout.height))
        .collect();
    assert_eq!(
        sizes,
        vec![(64, 48); 3],
        "every frame, one column and row less"
    );
}
