//! Sources: operators that produce frames. Each one stamps the stream id, a gap-free sequence
//! number and the capture time, and fills pooled buffers.

pub mod files;
pub mod images_folder;
pub mod synthetic;
