//! Reading Jupyter notebooks (`.ipynb`, nbformat 4): the code cells to run, in order.

use std::path::Path;

use nbagent_protocol::CellSource;
use serde::Deserialize;

/// Largest notebook file accepted.
pub const MAX_NOTEBOOK_BYTES: u64 = 64 << 20;

/// Errors reading a notebook.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotebookError {
    /// The file could not be read.
    #[error("cannot read notebook {path}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_NOTEBOOK_BYTES`].
    #[error("notebook {path} is {size} bytes, more than the {max} accepted")]
    TooLarge {
        /// The file.
        path: std::path::PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The file is not an nbformat 4 notebook.
    #[error("{path} is not a Jupyter notebook (nbformat 4)")]
    Format {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// A notebook's code cells and kernel name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notebook {
    /// Kernel name from the notebook's metadata (`python3` if absent).
    pub kernel: String,
    /// Code cells, in order.
    pub cells: Vec<CellSource>,
}

#[derive(Deserialize)]
struct Raw {
    nbformat: u32,
    #[serde(default)]
    metadata: RawMeta,
    cells: Vec<RawCell>,
}

#[derive(Deserialize, Default)]
struct RawMeta {
    #[serde(default)]
    kernelspec: Option<RawKernelspec>,
}

#[derive(Deserialize)]
struct RawKernelspec {
    name: String,
}

#[derive(Deserialize)]
struct RawCell {
    cell_type: String,
    #[serde(default)]
    id: Option<String>,
    source: Source,
}

/// nbformat allows the source as one string or a list of lines.
#[derive(Deserialize)]
#[serde(untagged)]
enum Source {
    Text(String),
    Lines(Vec<String>),
}

impl Notebook {
    /// Parses notebook JSON.
    pub fn parse(json: &str) -> Result<Self, serde_json::Error> {
        let raw: Raw = serde_json::from_str(json)?;
        if raw.nbformat != 4 {
            return Err(serde::de::Error::custom(format!(
                "nbformat {} is not supported (only 4)",
                raw.nbformat
            )));
        }
        let cells = raw
            .cells
            .into_iter()
            .enumerate()
            .filter(|(_, c)| c.cell_type == "code")
            .map(|(i, c)| CellSource {
                id: c.id.unwrap_or_else(|| format!("cell-{i}")),
                code: match c.source {
                    Source::Text(t) => t,
                    Source::Lines(l) => l.concat(),
                },
            })
            .collect();
        Ok(Self {
            kernel: raw
                .metadata
                .kernelspec
                .map_or_else(|| "python3".to_owned(), |k| k.name),
            cells,
        })
    }

    /// Reads and parses a notebook file.
    pub fn read(path: &Path) -> Result<Self, NotebookError> {
        let size = std::fs::metadata(path)
            .map_err(|source| NotebookError::Read {
                path: path.to_owned(),
                source,
            })?
            .len();
        if size > MAX_NOTEBOOK_BYTES {
            return Err(NotebookError::TooLarge {
                path: path.to_owned(),
                size,
                max: MAX_NOTEBOOK_BYTES,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| NotebookError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| NotebookError::Format {
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_cells_in_order_with_both_source_forms() {
        let nb = Notebook::parse(
            r##"{"nbformat":4,"nbformat_minor":5,"metadata":{"kernelspec":{"name":"python3"}},
            "cells":[{"cell_type":"markdown","source":"# t"},
                     {"cell_type":"code","id":"a","source":["x = 1\n","x"]},
                     {"cell_type":"code","source":"print(2)"}]}"##,
        )
        .unwrap();
        assert_eq!(nb.kernel, "python3");
        assert_eq!(nb.cells.len(), 2);
        assert_eq!(nb.cells[0].id, "a");
        assert_eq!(nb.cells[0].code, "x = 1\nx");
        assert_eq!(nb.cells[1].id, "cell-2");
    }

    #[test]
    fn refuses_other_formats() {
        assert!(Notebook::parse(r#"{"nbformat":3,"cells":[]}"#).is_err());
        assert!(Notebook::parse("[]").is_err());
    }

    #[test]
    fn the_sample_notebook_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sample.ipynb");
        let nb = Notebook::read(&p).unwrap();
        assert_eq!(nb.cells.len(), 6);
        assert!(nb.cells[2].code.contains("/data/notebook_files/sales.csv"));
        assert!(nb.cells[4].code.contains("plt.show()"));
    }
}
