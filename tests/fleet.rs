//! Fleet mode: three `inspectflow serve --fleet-nats` processes and one real nats-server on
//! 127.0.0.1 share twelve file-backed pipelines. Each runs exactly once; when one engine is
//! killed with SIGKILL its pipelines move to the others within 15 s, and no result of the
//! `block` file sources is lost in the hand-over (counted in the JetStream stream, where copies
//! sent again are de-duplicated by message id).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::nats::{NatsServer, repeated_ids, stored_messages};
use common::server::{Server, call, client};
use reqwest::StatusCode;
use serde_json::{Value, json};

const PIPELINES: usize = 12;
/// Frames of the clip: 15 s at 10 FPS, played in real time.
const FRAMES: u64 = 150;
const HAND_OVER_LIMIT: Duration = Duration::from_secs(15);

/// An H.264 MP4 of FRAMES frames at 10 FPS, written by GStreamer.
fn clip(path: &Path) {
    let status = Command::new("gst-launch-1.0")
        .arg("-q")
        .args(
            format!(
                "videotestsrc num-buffers={FRAMES} pattern=ball ! video/x-raw,format=I420,width=160,height=120,framerate=10/1 \
                 ! x264enc speed-preset=ultrafast ! mp4mux ! filesink location={}",
                path.display()
            )
            .split_whitespace(),
        )
        .status()
        .expect("gst-launch-1.0 runs");
    assert!(status.success(), "gst-launch-1.0 wrote {}", path.display());
}

/// Where a fleet test runs: a temporary folder, a NATS server with JetStream in it, and the clip
/// under the media root the engines may read.
struct Site {
    dir: tempfile::TempDir,
    nats: NatsServer,
    video: std::path::PathBuf,
    media_root: String,
    url: String,
}

fn site() -> Site {
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = NatsServer::start(dir.path());
    let media = dir.path().join("media");
    std::fs::create_dir_all(&media).expect("media dir");
    let video = media.join("line.mp4");
    clip(&video);
    let url = nats.url();
    Site {
        media_root: media.to_string_lossy().to_string(),
        dir,
        nats,
        video,
        url,
    }
}

fn fleet(http: &reqwest::blocking::Client, engine: &Server) -> Value {
    let (status, body) = call(http.get(engine.url("/api/fleet")));
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Which engine runs each running pipeline, by the fleet's answer.
fn placement(view: &Value) -> BTreeMap<String, String> {
    view["pipelines"]
        .as_array()
        .expect("pipelines")
        .iter()
        .filter(|p| p["state"] == "running")
        .map(|p| {
            (
                p["pipeline_id"].as_str().expect("id").to_string(),
                p["engine"].as_str().expect("engine").to_string(),
            )
        })
        .collect()
}

fn states(view: &Value) -> BTreeMap<String, String> {
    view["pipelines"]
        .as_array()
        .expect("pipelines")
        .iter()
        .map(|p| {
            (
                p["pipeline_id"].as_str().expect("id").to_string(),
                p["state"].as_str().expect("state").to_string(),
            )
        })
        .collect()
}

/// The metrics of a fleet pipeline's sink node (`out`), as its view reports them (null when the
/// view has none yet).
fn out_node(pipeline: &Value) -> &Value {
    pipeline["metrics"]["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["id"] == "out"))
        .unwrap_or(&Value::Null)
}

/// The lines of the engines' logs (`<data dir>/logs/app.log`, under `engine-<i>` of `dir`) that
/// mention pipeline `id`, each with its engine: what a failed assertion about it shows.
fn engine_log_lines(dir: &Path, id: &str) -> String {
    let mut lines = Vec::new();
    for engine in 0..3 {
        let log = dir.join(format!("engine-{engine}/logs/app.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        lines.extend(
            text.lines()
                .filter(|line| line.contains(id))
                .map(|line| format!("engine-{engine}: {line}")),
        );
    }
    lines.join("\n")
}

#[test]
fn a_fleet_runs_each_pipeline_once_and_hands_a_killed_engines_pipelines_over_losing_nothing() {
    let Site {
        dir,
        nats,
        video,
        media_root,
        url,
    } = site();
    let mut engines: Vec<Option<Server>> = (0..3)
        .map(|i| {
            let name = format!("engine-{i}");
            Some(engine(
                dir.path(),
                &name,
                &url,
                &media_root,
                &["--fleet-capacity", "6"],
            ))
        })
        .collect();
    let http = client();
    let first = engines[0].as_ref().expect("engine 0");
    let started = Instant::now();
    while fleet(&http, first)["engines"]
        .as_array()
        .map_or(0, Vec::len)
        < 3
    {
        assert!(started.elapsed() < Duration::from_secs(30), "engines join");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Bad input first: a wildcard-free id and a valid graph are required.
    let (status, body) = call(
        http.put(first.url("/api/fleet/pipelines/bad.id"))
            .json(&json!({"graph": "name: x"})),
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("pipeline_id"),
        "{body}"
    );
    let (status, body) = call(
        http.put(first.url("/api/fleet/pipelines/broken"))
            .json(&json!({"graph": "name: x\nnodes: [{id: a, op: source.nope}]\nedges: []"})),
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("source.nope"),
        "{body}"
    );

    for n in 0..PIPELINES {
        let graph = format!(
            "name: line\nnodes:\n  - {{id: camera, op: source.video_file, params: {{path: {}, realtime: true}}}}\n  \
             - {{id: out, op: sink.nats, params: {{url: \"{url}\", subject: \"fleet.{{pipeline}}\", stream: FLEET, initial_backoff_ms: 50, max_backoff_ms: 500}}}}\n\
             edges:\n  - {{from: camera, to: out, queue: {{policy: block}}}}\n",
            video.display()
        );
        let engine = engines[n % 3].as_ref().expect("engine");
        let (status, body) = call(
            http.put(engine.url(&format!("/api/fleet/pipelines/line-{n:02}")))
                .json(&json!({ "graph": graph })),
        );
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["pipeline_id"], format!("line-{n:02}"));
        // Putting the same graph again keeps its generation.
        let generation = body["generation"].clone();
        let (status, again) = call(
            http.put(engine.url(&format!("/api/fleet/pipelines/line-{n:02}")))
                .json(&json!({ "graph": graph })),
        );
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(again["generation"], generation);
    }

    // All twelve run, each on one engine, spread over the three.
    let started = Instant::now();
    let before = loop {
        let view = fleet(&http, first);
        let placed = placement(&view);
        if placed.len() == PIPELINES {
            break view;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "all pipelines run: {view}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let placed = placement(&before);
    let mut per_engine: BTreeMap<&str, usize> = BTreeMap::new();
    for engine in placed.values() {
        *per_engine.entry(engine).or_default() += 1;
    }
    assert_eq!(
        per_engine.len(),
        3,
        "every engine runs some: {per_engine:?}"
    );
    for engine in before["engines"].as_array().expect("engines") {
        let runs: BTreeSet<String> = engine["pipelines"]
            .as_array()
            .expect("runs")
            .iter()
            .map(|p| p.as_str().expect("id").to_string())
            .collect();
        let leased: BTreeSet<String> = placed
            .iter()
            .filter(|(_, e)| e.as_str() == engine["engine"])
            .map(|(p, _)| p.clone())
            .collect();
        assert!(
            runs.is_subset(&leased) || leased.is_subset(&runs),
            "an engine runs what it leases: {engine}"
        );
    }

    // Kill the busiest engine mid-run, like a machine losing power.
    std::thread::sleep(Duration::from_secs(2));
    let (victim_name, _) = per_engine
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(e, n)| (e.to_string(), *n))
        .expect("an engine");
    let victim_index: usize = victim_name
        .trim_start_matches("engine-")
        .parse()
        .expect("engine index");
    let orphans: BTreeSet<String> = placed
        .iter()
        .filter(|(_, e)| **e == victim_name)
        .map(|(p, _)| p.clone())
        .collect();
    let mut victim = engines[victim_index].take().expect("victim");
    victim.child.kill().expect("SIGKILL");
    let _ = victim.child.wait();
    let killed_at = Instant::now();
    let survivor = engines.iter().flatten().next().expect("a surviving engine");

    // Its pipelines move to the others, each to exactly one.
    let hand_over = loop {
        let view = fleet(&http, survivor);
        let placed = placement(&view);
        let states = states(&view);
        let moved = orphans
            .iter()
            .all(|p| placed.get(p).is_some_and(|e| *e != victim_name) || states[p] == "completed");
        if moved {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < HAND_OVER_LIMIT,
            "pipelines of {victim_name} not taken over within {HAND_OVER_LIMIT:?}: {view}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "hand-over of {} pipelines after SIGKILL: {:.1} s",
        orphans.len(),
        hand_over.as_secs_f64()
    );

    // Everything completes; every result is in the stream once.
    let started = Instant::now();
    let finished = loop {
        let view = fleet(&http, survivor);
        let states = states(&view);
        if states.values().all(|s| s == "completed" || s == "failed") {
            break view;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "pipelines complete: {view}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let mut duplicates_sent = 0;
    for pipeline in finished["pipelines"].as_array().expect("pipelines") {
        assert_eq!(pipeline["state"], "completed", "{pipeline}");
        let sink = &out_node(pipeline)["sink"];
        assert_eq!(sink["failed"], 0, "{pipeline}");
        let skipped = sink["skipped"].as_u64().unwrap_or(0);
        let id = pipeline["pipeline_id"].as_str().expect("id");
        // A pipeline that never moved was started once, on one engine. (JetStream may still
        // have dropped copies of its results: a publish whose acknowledgement came too late is
        // sent again, which is at-least-once delivery working, not a second run.)
        if !orphans.contains(id) {
            let log = engine_log_lines(dir.path(), id);
            let starts = log
                .lines()
                .filter(|line| line.contains("fleet: started"))
                .count();
            assert_eq!(
                starts, 1,
                "{id} ran once ({skipped} of its results sent again): {pipeline}\n\
                 what the engines logged about it:\n{log}"
            );
        }
        duplicates_sent += skipped;
    }
    let stored = stored_messages(&url, "FLEET");
    assert!(
        repeated_ids(&stored).is_empty(),
        "{:?}",
        repeated_ids(&stored)
    );
    let mut by_pipeline: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for message in &stored {
        by_pipeline
            .entry(
                message.message["pipeline"]
                    .as_str()
                    .expect("pipeline")
                    .to_string(),
            )
            .or_default()
            .insert(message.message["sequence"].as_u64().expect("sequence"));
    }
    assert_eq!(by_pipeline.len(), PIPELINES);
    for (pipeline, sequences) in &by_pipeline {
        assert_eq!(
            *sequences,
            (0..FRAMES).collect::<BTreeSet<_>>(),
            "{pipeline} has every result"
        );
    }
    assert_eq!(stored.len(), PIPELINES * FRAMES as usize);
    println!(
        "results stored: {} ({} pipelines x {FRAMES}); copies sent again (after the hand-over, or \
         after a late acknowledgement) and dropped by JetStream: {duplicates_sent}",
        stored.len(),
        PIPELINES
    );

    // An engine started without --fleet-nats says so.
    let plain_dir = dir.path().join("plain");
    std::fs::create_dir_all(&plain_dir).expect("data dir");
    let plain = Server::start(&plain_dir, None);
    let (status, body) = call(http.get(plain.url("/api/fleet")));
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("--fleet-nats"),
        "{body}"
    );
    drop(nats);
}

/// Starts fleet engine `name` (its data under `dir/name`) with `extra` flags.
fn engine(dir: &Path, name: &str, url: &str, media_root: &str, extra: &[&str]) -> Server {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).expect("data dir");
    let mut args = vec![
        "--fleet-nats",
        url,
        "--engine-id",
        name,
        "--path-root",
        media_root,
    ];
    args.extend_from_slice(extra);
    Server::start_with(&data, &args)
}

fn pipeline(http: &reqwest::blocking::Client, engine: &Server, id: &str) -> Value {
    let (status, body) = call(http.get(engine.url(&format!("/api/fleet/pipelines/{id}"))));
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

#[test]
fn a_stopping_engine_hands_its_pipeline_over_at_once_and_changes_and_deletes_reach_the_runner() {
    let Site {
        dir,
        nats,
        video,
        media_root,
        url,
    } = site();
    let http = client();
    let mut first = engine(dir.path(), "first", &url, &media_root, &[]);
    let graph = |subject: &str| {
        format!(
            "name: loop\nnodes:\n  - {{id: camera, op: source.video_file, params: {{path: {}, realtime: true, loop: true}}}}\n  \
             - {{id: out, op: sink.nats, params: {{url: \"{url}\", subject: \"{subject}\", stream: LOOPS}}}}\n\
             edges:\n  - {{from: camera, to: out, queue: {{policy: block}}}}\n",
            video.display()
        )
    };
    let (status, body) = call(
        http.put(first.url("/api/fleet/pipelines/endless"))
            .json(&json!({ "graph": graph("loops.a") })),
    );
    assert_eq!(status, StatusCode::CREATED, "{body}");
    wait_until("the first engine runs it", Duration::from_secs(20), || {
        pipeline(&http, &first, "endless")["engine"] == "first"
    });

    // A second engine joins; the first stops gracefully (SIGTERM) and hands the lease back, so
    // the second takes over well before the 6 s lease could lapse.
    let second = engine(dir.path(), "second", &url, &media_root, &[]);
    let status = Command::new("kill")
        .args(["-TERM", &first.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let stopped_at = Instant::now();
    let _ = first.child.wait();
    let took = wait_until(
        "the second engine takes over",
        Duration::from_secs(15),
        || {
            let view = pipeline(&http, &second, "endless");
            view["state"] == "running" && view["engine"] == "second"
        },
    );
    let hand_over = stopped_at.elapsed();
    println!("hand-over after SIGTERM: {:.1} s", hand_over.as_secs_f64());
    assert!(
        hand_over < Duration::from_secs(5),
        "a stopping engine hands its lease back instead of letting it lapse ({took:?})"
    );
    let (status, fleet_view) = call(http.get(second.url("/api/fleet")));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        fleet_view["engines"].as_array().map(Vec::len),
        Some(1),
        "the stopped engine left the fleet: {fleet_view}"
    );

    // A changed graph is a new generation, which the runner restarts.
    let generation = pipeline(&http, &second, "endless")["generation"]
        .as_u64()
        .expect("generation");
    let (status, body) = call(
        http.put(second.url("/api/fleet/pipelines/endless"))
            .json(&json!({ "graph": graph("loops.b") })),
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    let new_generation = body["generation"].as_u64().expect("generation");
    assert!(new_generation > generation);
    wait_until("the new generation runs", Duration::from_secs(20), || {
        let view = pipeline(&http, &second, "endless");
        view["state"] == "running" && view["generation"].as_u64() == Some(new_generation)
    });

    // Deleted: the runner stops it and it is gone from the fleet.
    let (status, body) = call(http.delete(second.url("/api/fleet/pipelines/endless")));
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    wait_until("the runner stops it", Duration::from_secs(20), || {
        let (_, view) = call(http.get(second.url("/api/fleet")));
        view["engines"][0]["pipelines"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    let (status, body) = call(http.get(second.url("/api/fleet/pipelines/endless")));
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let results = common::nats::stored_count(&url, "LOOPS");
    assert!(results > 0, "the pipeline published results");
    drop(nats);
}

#[test]
fn a_nats_restart_shorter_than_a_lease_leaves_fleet_runs_where_they_are() {
    let Site {
        dir,
        mut nats,
        video,
        media_root,
        url,
    } = site();
    let http = client();
    // A 12 s lease: renewals every 2 s, and a run is aborted once its lease went 8 s without
    // one, which leaves room for a loaded machine around the 3 s outage below.
    let only = engine(
        dir.path(),
        "only",
        &url,
        &media_root,
        &["--fleet-lease-s", "12"],
    );
    let graph = format!(
        "name: steady\nnodes:\n  - {{id: camera, op: source.video_file, params: {{path: {}, realtime: true, loop: true}}}}\n  \
         - {{id: out, op: sink.nats, params: {{url: \"{url}\", subject: \"steady\", stream: STEADY, initial_backoff_ms: 50, max_backoff_ms: 500}}}}\n\
         edges:\n  - {{from: camera, to: out, queue: {{policy: block}}}}\n",
        video.display()
    );
    let (status, body) = call(
        http.put(only.url("/api/fleet/pipelines/steady"))
            .json(&json!({ "graph": graph })),
    );
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let sent = |view: &Value| out_node(view)["packets_in"].as_u64().unwrap_or(0);
    wait_until("the engine runs it", Duration::from_secs(20), || {
        let view = pipeline(&http, &only, "steady");
        view["state"] == "running" && sent(&view) > 0
    });

    // NATS goes away and comes back (a crash and a restart on the same store): an outage well
    // within the lease costs the run nothing but a few retried publishes. (With async-nats's
    // default reconnect backoff, which grows to 4 s, the engine came back too late and aborted
    // the run.)
    nats.kill();
    std::thread::sleep(Duration::from_secs(3));
    nats.resume();
    let before = Instant::now();
    wait_until("the fleet answers again", Duration::from_secs(15), || {
        call(http.get(only.url("/api/fleet"))).0 == StatusCode::OK
    });
    // Longer than the lease: a run aborted for its lease would have been started again.
    std::thread::sleep(Duration::from_secs(13).saturating_sub(before.elapsed()));
    let view = pipeline(&http, &only, "steady");
    assert_eq!(view["state"], "running", "{view}");
    assert_eq!(view["engine"], "only", "{view}");
    let log = std::fs::read_to_string(dir.path().join("only/logs/app.log")).unwrap_or_default();
    let starts = log
        .lines()
        .filter(|line| line.contains("fleet: started") && line.contains("pipeline=steady"))
        .count();
    assert_eq!(starts, 1, "the run was never restarted:\n{log}");
    assert!(
        !log.contains("aborting"),
        "no run was aborted for its lease:\n{log}"
    );
    let sink = &out_node(&view)["sink"];
    assert_eq!(sink["failed"], 0, "{view}");
    // It went on publishing after the blip.
    let after = sent(&view);
    wait_until(
        "more results after the blip",
        Duration::from_secs(10),
        || sent(&pipeline(&http, &only, "steady")) > after,
    );
}
