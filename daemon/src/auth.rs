//! The bearer token clients present at the WebSocket handshake, kept in the state directory.
//!
//! Created on first start from the OS's random source, written with mode 0600. A token file
//! that others can read is not trusted: its mode is tightened and a warning logged, since
//! another local user may already have read it (delete the file to rotate the token).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The token file's name inside the state directory.
pub const TOKEN_FILE: &str = "token";

/// Loads the token from `state_dir`, creating directory and token on first use.
pub fn load_or_create(state_dir: &Path) -> std::io::Result<String> {
    std::fs::create_dir_all(state_dir)?;
    let _ = std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700));
    let path = token_path(state_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "token file was readable by others; mode set to 600 (delete it to rotate the token)");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
            let token = text.trim().to_string();
            if token.len() < 32 {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} holds no valid token; delete it to make a new one", path.display())));
            }
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = random_token()?;
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
            f.write_all(token.as_bytes())?;
            f.write_all(b"\n")?;
            Ok(token)
        }
        Err(e) => Err(e),
    }
}

/// Where the token lives.
pub fn token_path(state_dir: &Path) -> PathBuf {
    state_dir.join(TOKEN_FILE)
}

fn random_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares without an early exit, so the time taken does not reveal how much of a guess was
/// right: every byte of `expected` is visited whatever `given` holds (its length included), and
/// the accumulator goes through `black_box` so the optimizer cannot turn the loop into one that
/// stops at the first difference.
pub fn token_matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len() {
        diff = std::hint::black_box(diff | (a[i] ^ b.get(i).copied().unwrap_or(0)));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let t1 = load_or_create(dir.path()).unwrap();
        assert_eq!(t1.len(), 64);
        let mode = std::fs::metadata(token_path(dir.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(dir.path()).unwrap(), t1);
    }

    #[test]
    fn loose_permissions_are_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let t = load_or_create(dir.path()).unwrap();
        std::fs::set_permissions(token_path(dir.path()), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_or_create(dir.path()).unwrap(), t);
        let mode = std::fs::metadata(token_path(dir.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_token_file_without_a_valid_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(token_path(dir.path()), "short\n").unwrap();
        std::fs::set_permissions(token_path(dir.path()), std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&token_path(dir.path()).display().to_string()) && e.contains("no valid token"), "{e}");
    }

    /// A wrong guess takes as long whether it differs in the first byte or the last: the
    /// fastest of many timed batches (the least disturbed by the rest of the machine) of each
    /// kind agree within a factor of 2 (a byte loop that stops at the first difference does not).
    #[test]
    fn comparison_time_does_not_depend_on_where_a_guess_goes_wrong() {
        let expected = "3f".repeat(32);
        let mut first = expected.clone().into_bytes();
        first[0] = b'x';
        let mut last = expected.clone().into_bytes();
        last[63] = b'x';
        let (first, last) = (String::from_utf8(first).unwrap(), String::from_utf8(last).unwrap());
        let short = "3f".to_string();
        let batch = |guess: &str| {
            let t = std::time::Instant::now();
            for _ in 0..20_000 {
                assert!(!token_matches(std::hint::black_box(&expected), std::hint::black_box(guess)));
            }
            t.elapsed()
        };
        let (mut f, mut l, mut s) = (std::time::Duration::MAX, std::time::Duration::MAX, std::time::Duration::MAX);
        for _ in 0..40 {
            f = f.min(batch(&first));
            l = l.min(batch(&last));
            s = s.min(batch(&short));
        }
        let ratio = |a: std::time::Duration, b: std::time::Duration| a.as_secs_f64() / b.as_secs_f64();
        assert!((0.5..2.0).contains(&ratio(f, l)), "first byte wrong {f:?}, last byte wrong {l:?}");
        assert!((0.5..2.0).contains(&ratio(s, l)), "a short guess {s:?}, last byte wrong {l:?}");
    }

    #[test]
    fn comparison() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abc", "abd"));
        assert!(!token_matches("abc", "ab"));
        assert!(!token_matches("abc", "abcd"));
        assert!(!token_matches("abc", ""));
        assert!(!token_matches("", "a"));
        // A difference at any position is found.
        let t = "0123456789abcdef".repeat(4);
        for i in 0..t.len() {
            let mut g = t.clone().into_bytes();
            g[i] ^= 1;
            assert!(!token_matches(&t, std::str::from_utf8(&g).unwrap()), "position {i}");
        }
    }
}
