//! Jupyter kernelspecs: finding one by name in the search path, and parsing `kernel.json`.
//!
//! The search path ([`SpecSearch`]) is a list of `kernels` directories, searched in
//! order, first match wins; [`SpecSearch::standard`] builds Jupyter's usual one:
//! `$JUPYTER_PATH` entries + `/kernels`, `$JUPYTER_DATA_DIR/kernels`,
//! `~/.local/share/jupyter/kernels`, `<venv>/share/jupyter/kernels`,
//! `/usr/local/share/jupyter/kernels`, `/usr/share/jupyter/kernels`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tracing::warn;

/// Largest `kernel.json` read.
pub const MAX_SPEC_BYTES: u64 = 64 * 1024;

/// The placeholder in `argv` replaced with the connection file's path.
pub const CONNECTION_FILE: &str = "{connection_file}";

/// Errors of kernelspec lookup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// No kernelspec with this name in any searched directory.
    #[error(
        "no kernelspec named {name}; looked in {}; install the kernel (e.g. `python -m ipykernel install --prefix <venv>`) or add its directory to JUPYTER_PATH",
        display_dirs(.searched)
    )]
    NotFound {
        /// The name asked for.
        name: String,
        /// The `kernels` directories searched, in order.
        searched: Vec<PathBuf>,
    },
    /// The name is not a valid kernelspec name.
    #[error("invalid kernelspec name {name:?}: only letters, digits, '.', '_' and '-' are allowed")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// `kernel.json` could not be read.
    #[error("cannot read kernelspec file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `kernel.json` is larger than [`MAX_SPEC_BYTES`].
    #[error("kernelspec file {path} is larger than {max} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        max: u64,
    },
    /// `kernel.json` is not a valid kernelspec.
    #[error("kernelspec file {path} is not valid kernel.json")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The parse error (with line and column).
        #[source]
        source: serde_json::Error,
    },
    /// `argv` is empty.
    #[error("kernelspec file {path} has an empty argv")]
    EmptyArgv {
        /// The file.
        path: PathBuf,
    },
}

fn display_dirs(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "no directories (empty search path)".into();
    }
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// How the kernel is interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterruptMode {
    /// SIGINT to the kernel process (the default).
    #[default]
    Signal,
    /// An `interrupt_request` on the control channel.
    Message,
}

/// A parsed kernelspec.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelSpec {
    /// Its name (the directory name).
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Command line, with [`CONNECTION_FILE`] still in it (see [`KernelSpec::argv_for`]).
    pub argv: Vec<String>,
    /// Human-readable name.
    pub display_name: String,
    /// Language (`python`).
    pub language: String,
    /// How to interrupt it.
    pub interrupt_mode: InterruptMode,
    /// Environment variables the kernelspec sets.
    pub env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawSpec {
    argv: Vec<String>,
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    language: String,
    #[serde(default)]
    interrupt_mode: InterruptMode,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

impl KernelSpec {
    /// Parses `<dir>/kernel.json`; the spec is named after `dir`.
    pub fn load(dir: &Path) -> Result<KernelSpec, SpecError> {
        let path = dir.join("kernel.json");
        let read = |source| SpecError::Read {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(read)?;
        let mut bytes = Vec::new();
        file.take(MAX_SPEC_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read)?;
        if bytes.len() as u64 > MAX_SPEC_BYTES {
            return Err(SpecError::TooLarge {
                path,
                max: MAX_SPEC_BYTES,
            });
        }
        let raw: RawSpec =
            serde_json::from_slice(&bytes).map_err(|source| SpecError::Malformed {
                path: path.clone(),
                source,
            })?;
        if raw.argv.is_empty() {
            return Err(SpecError::EmptyArgv { path });
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(KernelSpec {
            display_name: if raw.display_name.is_empty() {
                name.clone()
            } else {
                raw.display_name
            },
            name,
            dir: dir.to_owned(),
            argv: raw.argv,
            language: raw.language,
            interrupt_mode: raw.interrupt_mode,
            env: raw.env,
        })
    }

    /// The argv with [`CONNECTION_FILE`] replaced by `connection_file` (and
    /// `{resource_dir}` by the kernelspec's directory, as Jupyter does).
    pub fn argv_for(&self, connection_file: &Path) -> Vec<String> {
        let cf = connection_file.to_string_lossy();
        let rd = self.dir.to_string_lossy();
        self.argv
            .iter()
            .map(|a| {
                a.replace(CONNECTION_FILE, &cf)
                    .replace("{resource_dir}", &rd)
            })
            .collect()
    }

    /// For a kernelspec installed inside a prefix (`<prefix>/share/jupyter/kernels/<name>`,
    /// e.g. a venv), `<prefix>/bin` if it exists: where a bare `argv[0]` such as `python`
    /// should be looked up first.
    pub fn prefix_bin(&self) -> Option<PathBuf> {
        let kernels = self.dir.parent()?;
        let jupyter = kernels.parent()?;
        let share = jupyter.parent()?;
        if kernels.file_name()? != "kernels"
            || jupyter.file_name()? != "jupyter"
            || share.file_name()? != "share"
        {
            return None;
        }
        let bin = share.parent()?.join("bin");
        bin.is_dir().then_some(bin)
    }
}

/// Whether `name` is a valid kernelspec name (no path separators, no `..`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The kernelspec search path: `kernels` directories, searched in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpecSearch {
    /// The directories.
    pub dirs: Vec<PathBuf>,
}

impl SpecSearch {
    /// A search path of exactly these `kernels` directories.
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        Self { dirs }
    }

    /// Jupyter's standard search path, from the given environment (`JUPYTER_PATH`,
    /// `JUPYTER_DATA_DIR`), home directory and kernel venv (or prefix).
    pub fn standard(
        env: impl Fn(&str) -> Option<String>,
        home: Option<&Path>,
        venv: Option<&Path>,
    ) -> Self {
        let mut dirs = Vec::new();
        if let Some(jp) = env("JUPYTER_PATH") {
            dirs.extend(
                std::env::split_paths(&jp)
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(|p| p.join("kernels")),
            );
        }
        if let Some(d) = env("JUPYTER_DATA_DIR").filter(|d| !d.is_empty()) {
            dirs.push(PathBuf::from(d).join("kernels"));
        }
        if let Some(h) = home {
            dirs.push(h.join(".local/share/jupyter/kernels"));
        }
        if let Some(v) = venv {
            dirs.push(v.join("share/jupyter/kernels"));
        }
        dirs.push("/usr/local/share/jupyter/kernels".into());
        dirs.push("/usr/share/jupyter/kernels".into());
        let mut seen = std::collections::HashSet::new();
        dirs.retain(|d| seen.insert(d.clone()));
        Self { dirs }
    }

    /// Finds the kernelspec `name`: the first directory holding `<name>/kernel.json`.
    pub fn find(&self, name: &str) -> Result<KernelSpec, SpecError> {
        if !valid_name(name) {
            return Err(SpecError::InvalidName { name: name.into() });
        }
        for dir in &self.dirs {
            let d = dir.join(name);
            if d.join("kernel.json").is_file() {
                return KernelSpec::load(&d);
            }
        }
        Err(SpecError::NotFound {
            name: name.into(),
            searched: self.dirs.clone(),
        })
    }

    /// Every installed kernelspec, by name (the first of each name in search order);
    /// unreadable or malformed ones are logged and left out.
    pub fn list(&self) -> Vec<KernelSpec> {
        let mut found: BTreeMap<String, KernelSpec> = BTreeMap::new();
        for dir in &self.dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| valid_name(n))
                .collect();
            names.sort();
            for name in names {
                let d = dir.join(&name);
                if found.contains_key(&name) || !d.join("kernel.json").is_file() {
                    continue;
                }
                match KernelSpec::load(&d) {
                    Ok(spec) => {
                        found.insert(name, spec);
                    }
                    Err(e) => {
                        warn!(kernel = %name, error = %e, cause = ?std::error::Error::source(&e).map(|c| c.to_string()), "skipping a kernelspec")
                    }
                }
            }
        }
        found.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_spec(root: &Path, name: &str, json: &str) -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("kernel.json"), json).unwrap();
        d
    }

    #[test]
    fn standard_path_order() {
        let env = |k: &str| match k {
            "JUPYTER_PATH" => Some("/a:/b".to_string()),
            "JUPYTER_DATA_DIR" => Some("/data".to_string()),
            _ => None,
        };
        let s = SpecSearch::standard(env, Some(Path::new("/home/u")), Some(Path::new("/venv")));
        let want: Vec<PathBuf> = [
            "/a/kernels",
            "/b/kernels",
            "/data/kernels",
            "/home/u/.local/share/jupyter/kernels",
            "/venv/share/jupyter/kernels",
            "/usr/local/share/jupyter/kernels",
            "/usr/share/jupyter/kernels",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(s.dirs, want);
    }

    #[test]
    fn first_match_wins_and_list_dedups() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write_spec(a.path(), "k", r#"{"argv":["a"],"display_name":"A"}"#);
        write_spec(b.path(), "k", r#"{"argv":["b"],"display_name":"B"}"#);
        write_spec(b.path(), "other", r#"{"argv":["o"]}"#);
        write_spec(b.path(), "broken", "{");
        let s = SpecSearch::new(vec![a.path().into(), b.path().into()]);
        assert_eq!(s.find("k").unwrap().display_name, "A");
        let names: Vec<_> = s.list().into_iter().map(|k| k.name).collect();
        assert_eq!(names, vec!["k", "other"]);
        assert_eq!(s.find("other").unwrap().display_name, "other");
    }

    #[test]
    fn rejects_bad_names_and_large_files() {
        let s = SpecSearch::new(vec![]);
        assert!(matches!(
            s.find("../etc"),
            Err(SpecError::InvalidName { .. })
        ));
        let a = tempfile::tempdir().unwrap();
        let big = format!(
            r#"{{"argv":["x"],"display_name":"{}"}}"#,
            "x".repeat(70_000)
        );
        write_spec(a.path(), "big", &big);
        let s = SpecSearch::new(vec![a.path().into()]);
        assert!(matches!(s.find("big"), Err(SpecError::TooLarge { .. })));
        write_spec(a.path(), "empty", r#"{"argv":[]}"#);
        assert!(matches!(s.find("empty"), Err(SpecError::EmptyArgv { .. })));
    }

    #[test]
    fn substitutes_connection_file() {
        let a = tempfile::tempdir().unwrap();
        let d = write_spec(
            a.path(),
            "k",
            r#"{"argv":["python","-f","{connection_file}","--rd={resource_dir}"]}"#,
        );
        let spec = KernelSpec::load(&d).unwrap();
        assert_eq!(
            spec.argv_for(Path::new("/run/k.json")),
            vec![
                "python".to_string(),
                "-f".into(),
                "/run/k.json".into(),
                format!("--rd={}", d.display())
            ]
        );
        assert_eq!(spec.prefix_bin(), None);
    }
}
