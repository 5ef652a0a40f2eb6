//! `disk`: free space on the filesystem holding a path is above a threshold.

use std::ffi::CString;
use std::path::PathBuf;

use super::{Check, CheckFuture, Level, Outcome};
use crate::config::{CheckConfig, Threshold};

/// Measures free space with statvfs(3).
pub struct DiskCheck {
    path: PathBuf,
    min_free: Threshold,
    level: Level,
}

/// Free and total bytes available to an unprivileged process.
struct Space {
    free: u64,
    total: u64,
}

impl DiskCheck {
    /// The check for the entry's `path` and `min_free`.
    pub fn new(check: &CheckConfig, level: Level) -> DiskCheck {
        DiskCheck {
            path: PathBuf::from(check.path.clone().unwrap_or_default()),
            min_free: check.min_free.unwrap_or(Threshold::Bytes(0)),
            level,
        }
    }

    async fn check(&self) -> Outcome {
        let path = self.path.clone();
        let space = match tokio::task::spawn_blocking(move || statvfs(&path)).await {
            Ok(Ok(space)) => space,
            Ok(Err(e)) => {
                return Outcome::fail(
                    "sidecar.E006",
                    self.level,
                    format!("cannot read free space of {}: {e}", self.path.display()),
                )
            }
            Err(e) => {
                return Outcome::fail(
                    "sidecar.E006",
                    self.level,
                    format!("disk check did not finish: {e}"),
                )
            }
        };
        let percent = if space.total == 0 {
            0.0
        } else {
            space.free as f64 * 100.0 / space.total as f64
        };
        let enough = match self.min_free {
            Threshold::Bytes(bytes) => space.free >= bytes,
            Threshold::Percent(p) => percent >= p,
        };
        if enough {
            return Outcome::default();
        }
        let wanted = String::from(self.min_free);
        Outcome::fail(
            "sidecar.E005",
            self.level,
            format!(
                "{}: {} free ({percent:.1}%), less than {wanted}",
                self.path.display(),
                bytesize::ByteSize(space.free).display().iec()
            ),
        )
    }
}

fn statvfs(path: &std::path::Path) -> std::io::Result<Space> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
    })?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points to
    // writable memory of the right type; statvfs fills it on success.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let stat = unsafe { stat.assume_init() };
    // The field types differ between platforms (u32 on some 32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    let (fragment, available, blocks) = (
        stat.f_frsize as u64,
        stat.f_bavail as u64,
        stat.f_blocks as u64,
    );
    Ok(Space {
        free: available * fragment,
        total: blocks * fragment,
    })
}

impl Check for DiskCheck {
    fn run(&self) -> CheckFuture<'_> {
        Box::pin(self.check())
    }
}
