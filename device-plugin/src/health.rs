//! Is the node's KVM device there and usable?
//!
//! The rule ([`probe`] and [`Finding::health`]):
//!
//! | what the path is | result |
//! |---|---|
//! | character device 10:232, opened, `KVM_GET_API_VERSION` = 12 | Healthy |
//! | character device 10:232, open refused with `EPERM` or `EACCES` | Healthy (see below) |
//! | missing, another file type, another device number | Unhealthy |
//! | any other open error, another API version, ioctl error | Unhealthy |
//!
//! Why a refused open still counts as healthy: the plugin normally runs in an unprivileged pod,
//! and the devices cgroup of such a container refuses `open("/dev/kvm")` with `EPERM` even for
//! root, so the plugin cannot ask KVM for its API version. The node does have the KVM device (the
//! path is the KVM character device), and the pods that get a slot are not in the plugin's
//! cgroup: the kubelet adds the device to theirs. `EACCES` (file mode, or a `nodev` mount of the
//! node's `/dev`) is the same situation one layer down. Counting these as unhealthy would make
//! the plugin useless unless it runs privileged, which is what it exists to avoid.

use std::fmt;
use std::fs::{self, File, FileType};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Major number of Linux misc devices.
pub const KVM_MAJOR: u32 = 10;
/// Minor number of `/dev/kvm` among the misc devices (`KVM_MINOR` in `linux/miscdevice.h`).
pub const KVM_MINOR: u32 = 232;
/// The only KVM API version there has ever been (`KVM_API_VERSION` in `linux/kvm.h`).
pub const KVM_API_VERSION: i32 = 12;

/// `KVM_GET_API_VERSION` = `_IO(KVMIO, 0x00)` with `KVMIO` = 0xAE.
const KVM_GET_API_VERSION: u32 = 0xAE00;

/// Health of the device as the kubelet sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The kubelet may hand out slots.
    Healthy,
    /// The kubelet must not hand out slots; running pods keep theirs.
    Unhealthy,
}

impl Health {
    /// The string the device plugin API uses (`Device.health`).
    pub fn as_api_str(self) -> &'static str {
        match self {
            Health::Healthy => crate::api::HEALTHY,
            Health::Unhealthy => crate::api::UNHEALTHY,
        }
    }
}

/// What a [`probe`] found. Errors are kept as errno values so that two probes that found the same
/// thing compare equal (the plugin logs only changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    /// Opened, and KVM reports API version 12.
    Usable,
    /// The KVM character device, but this process may not open it (`EPERM` or `EACCES`).
    PresentNotOpenable {
        /// The error of the open.
        errno: i32,
    },
    /// Nothing at the path.
    Missing,
    /// The path could not be examined (for example a directory on the way is not searchable).
    Inaccessible {
        /// The error of `stat`.
        errno: i32,
    },
    /// Something other than a character device.
    NotCharDevice {
        /// What it is instead.
        kind: &'static str,
    },
    /// A character device other than KVM.
    WrongDevice {
        /// Its major number.
        major: u32,
        /// Its minor number.
        minor: u32,
    },
    /// The open failed for another reason (`ENXIO` or `ENODEV`: the node exists but no driver is
    /// behind it).
    OpenFailed {
        /// The error of the open.
        errno: i32,
    },
    /// KVM answered with an API version this plugin does not know.
    WrongApiVersion {
        /// The version returned.
        version: i32,
    },
    /// `KVM_GET_API_VERSION` failed.
    IoctlFailed {
        /// The error of the ioctl.
        errno: i32,
    },
}

impl Finding {
    /// The health this finding means (the table in the module documentation).
    pub fn health(self) -> Health {
        match self {
            Finding::Usable | Finding::PresentNotOpenable { .. } => Health::Healthy,
            _ => Health::Unhealthy,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let os = |errno: i32| io::Error::from_raw_os_error(errno);
        match *self {
            Finding::Usable => write!(f, "KVM is usable (API version {KVM_API_VERSION})"),
            Finding::PresentNotOpenable { errno } => write!(
                f,
                "the KVM character device {KVM_MAJOR}:{KVM_MINOR} is present but this process may not open it ({}); \
                 counted as healthy: an unprivileged container's devices cgroup refuses the open even for root, \
                 and pods given a slot get access from the kubelet",
                os(errno)
            ),
            Finding::Missing => f.write_str(
                "no such file: load the kvm module (kvm_intel or kvm_amd) or enable virtualization for this node; \
                 in a pod, check that the node's /dev is mounted where --device-path points",
            ),
            Finding::Inaccessible { errno } => write!(f, "cannot examine the path ({})", os(errno)),
            Finding::NotCharDevice { kind } => {
                write!(f, "this is a {kind}, not the KVM character device {KVM_MAJOR}:{KVM_MINOR}; check --device-path")
            }
            Finding::WrongDevice { major, minor } => write!(
                f,
                "this is character device {major}:{minor}, not KVM ({KVM_MAJOR}:{KVM_MINOR}); check --device-path"
            ),
            Finding::OpenFailed { errno } => {
                write!(f, "opening the device failed ({}); is the kvm module loaded?", os(errno))
            }
            Finding::WrongApiVersion { version } => {
                write!(f, "KVM_GET_API_VERSION returned {version}, expected {KVM_API_VERSION}")
            }
            Finding::IoctlFailed { errno } => write!(f, "KVM_GET_API_VERSION failed ({})", os(errno)),
        }
    }
}

/// Examines `path` (following symlinks) and says what it is. Never blocks for long: a `stat`, an
/// `open` and one ioctl that only returns a constant.
pub fn probe(path: &Path) -> Finding {
    let metadata = match fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Finding::Missing,
        Err(e) => return Finding::Inaccessible { errno: errno(&e) },
    };
    if !metadata.file_type().is_char_device() {
        return Finding::NotCharDevice { kind: kind_of(metadata.file_type()) };
    }
    let rdev = metadata.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    if (major, minor) != (KVM_MAJOR, KVM_MINOR) {
        return Finding::WrongDevice { major, minor };
    }
    // Read-only is enough for KVM_GET_API_VERSION, and the pod mounts the node's /dev read-only.
    match File::open(path) {
        Ok(file) => api_version(&file),
        Err(e) => open_error(&e),
    }
}

/// Classifies a failed open of a path that is the KVM character device.
pub fn open_error(e: &io::Error) -> Finding {
    match e.raw_os_error() {
        Some(errno @ (libc::EPERM | libc::EACCES)) => Finding::PresentNotOpenable { errno },
        _ => Finding::OpenFailed { errno: errno(e) },
    }
}

fn api_version(file: &File) -> Finding {
    // SAFETY: KVM_GET_API_VERSION takes no argument and touches no memory of ours; `file` is an
    // open descriptor that outlives the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION as _) };
    match ret {
        KVM_API_VERSION => Finding::Usable,
        -1 => Finding::IoctlFailed { errno: errno(&io::Error::last_os_error()) },
        version => Finding::WrongApiVersion { version },
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn kind_of(file_type: FileType) -> &'static str {
    if file_type.is_dir() {
        "directory"
    } else if file_type.is_file() {
        "regular file"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kvm_device_of_this_machine_is_usable() {
        // The project needs a usable /dev/kvm on every machine that runs its tests.
        assert_eq!(probe(Path::new("/dev/kvm")), Finding::Usable);
        assert_eq!(Finding::Usable.health(), Health::Healthy);
    }

    #[test]
    fn a_symlink_to_the_device_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("kvm");
        std::os::unix::fs::symlink("/dev/kvm", &link).unwrap();
        assert_eq!(probe(&link), Finding::Usable);
        fs::remove_file(&link).unwrap();
        assert_eq!(probe(&link), Finding::Missing);
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        assert_eq!(probe(&link), Finding::Missing, "a dangling symlink is a missing device");
    }

    #[test]
    fn other_files_are_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kvm");
        fs::write(&file, b"").unwrap();
        assert_eq!(probe(&file), Finding::NotCharDevice { kind: "regular file" });
        assert_eq!(probe(dir.path()), Finding::NotCharDevice { kind: "directory" });
        assert_eq!(probe(Path::new("/dev/null")), Finding::WrongDevice { major: 1, minor: 3 });
        assert_eq!(probe(&dir.path().join("absent")), Finding::Missing);
        for finding in [
            Finding::Missing,
            Finding::NotCharDevice { kind: "regular file" },
            Finding::WrongDevice { major: 1, minor: 3 },
            Finding::Inaccessible { errno: libc::EACCES },
            Finding::OpenFailed { errno: libc::ENXIO },
            Finding::WrongApiVersion { version: 11 },
            Finding::IoctlFailed { errno: libc::ENOTTY },
        ] {
            assert_eq!(finding.health(), Health::Unhealthy, "{finding}");
        }
    }

    #[test]
    fn a_refused_open_of_the_kvm_device_counts_as_healthy() {
        // What the devices cgroup of an unprivileged container does (EPERM), and file modes
        // (EACCES); cannot be produced here without changing the machine's cgroups.
        for errno in [libc::EPERM, libc::EACCES] {
            let finding = open_error(&io::Error::from_raw_os_error(errno));
            assert_eq!(finding, Finding::PresentNotOpenable { errno });
            assert_eq!(finding.health(), Health::Healthy);
            assert!(finding.to_string().contains("devices cgroup"), "{finding}");
        }
        let finding = open_error(&io::Error::from_raw_os_error(libc::ENXIO));
        assert_eq!(finding, Finding::OpenFailed { errno: libc::ENXIO });
        assert_eq!(finding.health(), Health::Unhealthy);
    }

    #[test]
    fn api_strings() {
        assert_eq!(Health::Healthy.as_api_str(), "Healthy");
        assert_eq!(Health::Unhealthy.as_api_str(), "Unhealthy");
    }
}
