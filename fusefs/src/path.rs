//! Name and path validation: everything that names a file, from the kernel or from the
//! backing, passes through here first.
//!
//! A *name* is one component: not empty, not `.` or `..`, no `/`, no NUL, UTF-8 (the
//! protocol's paths are strings), at most [`MAX_NAME`] bytes. A *path* is names joined by
//! single `/`, relative, at most [`MAX_PATH`] bytes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::error::PathError;

/// Longest name, in bytes.
pub const MAX_NAME: usize = 255;
/// Longest path, in bytes.
pub const MAX_PATH: usize = 4096;

/// Validates one component given as raw bytes (from the kernel).
pub fn validate_name_os(name: &OsStr) -> Result<&str, PathError> {
    let bytes = name.as_bytes();
    check_name_bytes(bytes)?;
    std::str::from_utf8(bytes).map_err(|_| PathError::NotUtf8)
}

/// Validates one component.
pub fn validate_name(name: &str) -> Result<&str, PathError> {
    check_name_bytes(name.as_bytes())?;
    Ok(name)
}

fn check_name_bytes(bytes: &[u8]) -> Result<(), PathError> {
    if bytes.is_empty() {
        return Err(PathError::Empty);
    }
    if bytes == b"." || bytes == b".." {
        return Err(PathError::Dot);
    }
    if bytes.contains(&b'/') {
        return Err(PathError::Slash);
    }
    if bytes.contains(&0) {
        return Err(PathError::Nul);
    }
    if bytes.len() > MAX_NAME {
        return Err(PathError::NameTooLong(bytes.len()));
    }
    Ok(())
}

/// Validates a relative path and returns its components.
pub fn split_path(path: &str) -> Result<Vec<&str>, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH {
        return Err(PathError::PathTooLong(path.len()));
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    path.split('/').map(validate_name).collect()
}

/// Joins a parent path (empty for the root) and a validated name, checking the length.
pub fn join(parent: &str, name: &str) -> Result<String, PathError> {
    let joined = if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    };
    if joined.len() > MAX_PATH {
        return Err(PathError::PathTooLong(joined.len()));
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(validate_name("a.csv"), Ok("a.csv"));
        assert_eq!(validate_name(""), Err(PathError::Empty));
        assert_eq!(validate_name("."), Err(PathError::Dot));
        assert_eq!(validate_name(".."), Err(PathError::Dot));
        assert_eq!(validate_name("a/b"), Err(PathError::Slash));
        assert_eq!(validate_name("a\0b"), Err(PathError::Nul));
        assert_eq!(validate_name(&"x".repeat(255)).map(str::len), Ok(255));
        assert_eq!(
            validate_name(&"x".repeat(256)),
            Err(PathError::NameTooLong(256))
        );
        assert_eq!(
            validate_name_os(OsStr::from_bytes(b"\xff")),
            Err(PathError::NotUtf8)
        );
        assert_eq!(validate_name("...").map(str::len), Ok(3));
    }

    #[test]
    fn paths() {
        assert_eq!(split_path("a/b/c"), Ok(vec!["a", "b", "c"]));
        assert_eq!(split_path("../x"), Err(PathError::Dot));
        assert_eq!(split_path("a/../x"), Err(PathError::Dot));
        assert_eq!(split_path("/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(split_path("a//b"), Err(PathError::Empty));
        assert_eq!(split_path("a/"), Err(PathError::Empty));
        assert_eq!(split_path("./a"), Err(PathError::Dot));
        let long = vec!["x".repeat(200); 21].join("/");
        assert_eq!(split_path(&long), Err(PathError::PathTooLong(long.len())));
        assert_eq!(join("", "a"), Ok("a".to_owned()));
        assert_eq!(join("a", "b"), Ok("a/b".to_owned()));
    }
}
