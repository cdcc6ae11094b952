//! Job log files: where they are, and reading them a buffer at a time (a log can grow long;
//! neither a viewer of `GET /api/jobs/{id}/logs` nor a job queued again holds one whole).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A job's log file.
pub(crate) fn log_path(data_dir: &Path, job_id: &str) -> PathBuf {
    data_dir.join("jobs").join(format!("{job_id}.log"))
}

/// Where [`log_file_lines`] reads from.
enum LogSource {
    Unopened(PathBuf),
    Open(BufReader<tokio::fs::File>),
}

/// The lines of the log file at `path` as it is when read, a 64 KiB buffer at a time (a log
/// never sits whole in memory); `count` ends holding how many were given. No file: no lines.
/// A last line without its newline is given only when `ended` (nobody writes the file any
/// more): otherwise it is still being written, and comes whole with the job's live lines.
pub(crate) fn log_file_lines(
    path: PathBuf,
    count: Arc<AtomicU64>,
    ended: bool,
) -> impl futures::Stream<Item = String> {
    futures::stream::unfold(
        (LogSource::Unopened(path), count),
        move |(source, count)| async move {
            let mut reader = match source {
                LogSource::Open(reader) => reader,
                LogSource::Unopened(path) => {
                    BufReader::with_capacity(64 * 1024, tokio::fs::File::open(&path).await.ok()?)
                }
            };
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => None,
                Ok(_) if !ended && line.last() != Some(&b'\n') => None,
                Ok(_) => {
                    count.fetch_add(1, Ordering::AcqRel);
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\n', '\r']).to_string();
                    Some((text, (LogSource::Open(reader), count)))
                }
            }
        },
    )
}

/// How many lines the log file at `path` holds (0 without one), read a buffer at a time.
pub(crate) async fn count_log_lines(path: &Path) -> u64 {
    let count = Arc::new(AtomicU64::new(0));
    log_file_lines(path.to_path_buf(), Arc::clone(&count), true)
        .for_each(|_| async {})
        .await;
    count.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_read_lossily_and_a_line_still_being_written_is_left_to_the_live_ones() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("job.log");
        std::fs::write(&path, b"first\r\nbad \xff byte\n\nlast without newline").expect("writes");
        let count = Arc::new(AtomicU64::new(0));
        let lines: Vec<String> = log_file_lines(path.clone(), Arc::clone(&count), true)
            .collect()
            .await;
        assert_eq!(
            lines,
            ["first", "bad \u{fffd} byte", "", "last without newline"]
        );
        assert_eq!(count.load(Ordering::Acquire), 4);
        // While the job runs, a last line without its newline is still being written: it is
        // neither given nor counted, so the live lines bring it whole.
        let count = Arc::new(AtomicU64::new(0));
        let lines: Vec<String> = log_file_lines(path.clone(), Arc::clone(&count), false)
            .collect()
            .await;
        assert_eq!(lines, ["first", "bad \u{fffd} byte", ""]);
        assert_eq!(count.load(Ordering::Acquire), 3);
        assert_eq!(count_log_lines(&path).await, 4);
        assert_eq!(count_log_lines(&dir.path().join("missing.log")).await, 0);
    }
}
