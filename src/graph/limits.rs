//! Limits on graph documents. A graph arrives from a file or an API request written by someone
//! else, so reading one never recurses without a bound and never grows without one: every
//! document is held to a size, a nesting depth, a count of values (after YAML aliases are
//! expanded, which are bounded on their own), and counts of nodes and edges.
//!
//! One type feeds the command line (`validate`, `run`, `graph`, `serve` flags and their
//! `INSPECTFLOW_GRAPH_*` environment variables), the server and the README's "Limits and
//! security" table.

/// The limits a graph document is held to; exceeding one is an error naming the document and
/// the limit (with its flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct GraphLimits {
    /// Largest graph document, in bytes.
    #[arg(
        long = "graph-max-bytes",
        env = "INSPECTFLOW_GRAPH_MAX_BYTES",
        default_value_t = GraphLimits::DEFAULT.max_bytes,
        value_name = "BYTES"
    )]
    pub max_bytes: usize,
    /// Deepest nesting of lists and maps in a graph document.
    #[arg(
        long = "graph-max-depth",
        env = "INSPECTFLOW_GRAPH_MAX_DEPTH",
        default_value_t = GraphLimits::DEFAULT.max_depth,
        value_name = "LEVELS"
    )]
    pub max_depth: usize,
    /// Most values (scalars, lists and maps, counting the copies aliases make and anchors hold;
    /// a string counts as one value per 64 bytes) in a graph document.
    #[arg(
        long = "graph-max-values",
        env = "INSPECTFLOW_GRAPH_MAX_VALUES",
        default_value_t = GraphLimits::DEFAULT.max_values,
        value_name = "COUNT"
    )]
    pub max_values: usize,
    /// Most values that YAML aliases (`*name`) may copy into a graph document, in all (a string
    /// counts as one value per 64 bytes).
    #[arg(
        long = "graph-max-alias-values",
        env = "INSPECTFLOW_GRAPH_MAX_ALIAS_VALUES",
        default_value_t = GraphLimits::DEFAULT.max_alias_values,
        value_name = "COUNT"
    )]
    pub max_alias_values: usize,
    /// Most nodes in a graph.
    #[arg(
        long = "graph-max-nodes",
        env = "INSPECTFLOW_GRAPH_MAX_NODES",
        default_value_t = GraphLimits::DEFAULT.max_nodes,
        value_name = "COUNT"
    )]
    pub max_nodes: usize,
    /// Most edges in a graph.
    #[arg(
        long = "graph-max-edges",
        env = "INSPECTFLOW_GRAPH_MAX_EDGES",
        default_value_t = GraphLimits::DEFAULT.max_edges,
        value_name = "COUNT"
    )]
    pub max_edges: usize,
}

impl GraphLimits {
    /// The defaults: far above any real pipeline (a few dozen nodes, a few KB), far below what
    /// hurts a 2-core machine with 4 GB to spare.
    pub const DEFAULT: GraphLimits = GraphLimits {
        max_bytes: 16 << 20,
        max_depth: 64,
        max_values: 2_000_000,
        max_alias_values: 10_000,
        max_nodes: 100_000,
        max_edges: 200_000,
    };
}

impl GraphLimits {
    /// Refuses a document of `len` bytes over the size limit.
    pub(crate) fn check_size(&self, len: usize) -> Result<(), String> {
        if len > self.max_bytes {
            return Err(exceeded("bytes", self.max_bytes, "--graph-max-bytes"));
        }
        Ok(())
    }
}

impl Default for GraphLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// "more than N things (limit: --flag)", the wording of every limit error.
pub(crate) fn exceeded(what: &str, limit: usize, flag: &str) -> String {
    format!(
        "more than {limit} {what} (limit: {flag}, or INSPECTFLOW_{} in the environment)",
        flag.trim_start_matches("--")
            .replace('-', "_")
            .to_uppercase()
    )
}
