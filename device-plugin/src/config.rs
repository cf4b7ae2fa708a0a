//! Command line and validated configuration.
//!
//! Everything the kubelet would refuse (a resource name it does not accept as an extended
//! resource) is refused here first, with a message that says what to pass instead; the kubelet's
//! own answer is a terse gRPC error in its log.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::api;

/// Resource name advertised when `--resource-name` is not given.
pub const DEFAULT_RESOURCE_NAME: &str = "devices.lockstep.dev/kvm";

/// Default number of slots (how many KVM pods one node accepts).
pub const DEFAULT_SLOTS: u32 = 32;

/// Upper bound on `--slots`. Every `ListAndWatch` message lists every slot and the kubelet keeps
/// them all in its checkpoint; a few thousand is already far more KVM pods than a node runs.
pub const MAX_SLOTS: u32 = 4096;

/// Default `--health-interval-ms`.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Prefix of every device ID: `kvm-0`, `kvm-1`, ...
pub const DEVICE_ID_PREFIX: &str = "kvm-";

/// Path of the device inside the containers that get a slot.
pub const CONTAINER_DEVICE_PATH: &str = "/dev/kvm";

const LONG_ABOUT: &str = "\
Kubernetes device plugin for KVM.

Advertises the node's KVM device (--device-path, default /dev/kvm) to the kubelet as the extended
resource --resource-name with --slots identical slots (device IDs kvm-0, kvm-1, ...). Every slot
is the same device: KVM can be opened by any number of processes, so the slot count only caps how
many pods that request the resource run on one node. A pod asks for it with

    resources:
      limits:
        devices.lockstep.dev/kvm: 1

and the kubelet then creates /dev/kvm in its container and allows it in the container's devices
cgroup, without making the pod privileged.

Health: the device is Healthy when --device-path is a character device 10:232 (the KVM misc
device) and, if this process may open it, KVM_GET_API_VERSION returns 12. When the open is refused
(EPERM from the devices cgroup of an unprivileged container, or EACCES) the device still counts as
Healthy: the node has KVM, and the pods that get a slot are given access by the kubelet. A missing
path, another kind of file or another device number is Unhealthy; the kubelet then stops placing
new pods on the node's slots until the device is back.

The plugin serves its socket in --plugin-dir, registers with the kubelet's kubelet.sock there, and
registers again whenever the kubelet restarts (it empties the directory at start). SIGTERM or
SIGINT removes the socket and exits 0. Logs go to stderr; RUST_LOG sets the filter (default info).";

/// Command line of `lockstep-device-plugin`.
#[derive(Debug, Parser)]
#[command(name = "lockstep-device-plugin", version, about = "Kubernetes device plugin for KVM", long_about = LONG_ABOUT)]
pub struct Cli {
    /// The kubelet's device plugin directory: the plugin serves its socket here and registers
    /// through the kubelet's kubelet.sock in it. In a pod, mount the node's directory at the same
    /// path.
    #[arg(long, value_name = "DIR", default_value = api::DEFAULT_PLUGIN_DIR)]
    pub plugin_dir: PathBuf,

    /// Extended resource to advertise, DOMAIN/NAME. Pods request it in their limits. Must not be in
    /// the kubernetes.io domain. Use the same name in the operator (the chart's kvmResourceName).
    #[arg(long, value_name = "DOMAIN/NAME", default_value = DEFAULT_RESOURCE_NAME, value_parser = ResourceName::parse)]
    pub resource_name: ResourceName,

    /// Number of identical slots to advertise (device IDs kvm-0 .. kvm-<SLOTS-1>): the most pods
    /// with this resource that the node runs at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SLOTS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SLOTS)))]
    pub slots: u32,

    /// Where this process checks the KVM device. In a pod that mounts the node's /dev at /host/dev,
    /// pass /host/dev/kvm together with --host-device-path /dev/kvm.
    #[arg(long, value_name = "PATH", default_value = CONTAINER_DEVICE_PATH)]
    pub device_path: PathBuf,

    /// The device's path on the node, which Allocate gives the kubelet (the kubelet resolves it on
    /// the host, not in this container). Defaults to --device-path, which is right when the plugin
    /// sees the node's /dev at /dev.
    #[arg(long, value_name = "PATH")]
    pub host_device_path: Option<PathBuf>,

    /// Another device node on the node to give, at the same path, to every container that gets
    /// the KVM device; repeatable. The chart passes /dev/net/tun so that an agent can open the
    /// TAP device the node prepared for a layer-2 VM (docs/network.md), which needs no
    /// capability once the TAP belongs to the agent's uid. Must be an absolute path under /dev.
    #[arg(long, value_name = "PATH", value_parser = parse_extra_device)]
    pub also_device: Vec<PathBuf>,

    /// How often to re-check the device and the plugin's socket, in milliseconds. A device that
    /// goes away, and a kubelet restart, are noticed within this time.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_HEALTH_INTERVAL.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub health_interval_ms: u64,

    /// Log format on stderr: text (no colours unless stderr is a terminal) or json (one object per
    /// line, for log collectors).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Cli {
    /// The plugin's configuration from the parsed flags.
    pub fn config(&self) -> Config {
        Config {
            plugin_dir: self.plugin_dir.clone(),
            resource_name: self.resource_name.clone(),
            slots: self.slots,
            device_path: self.device_path.clone(),
            host_device_path: self.host_device_path.clone().unwrap_or_else(|| self.device_path.clone()),
            extra_devices: self.also_device.clone(),
            health_interval: Duration::from_millis(self.health_interval_ms),
        }
    }
}

pub use lockstep_logging::LogFormat;

/// `--also-device`: an absolute path under /dev with no `..` (the kubelet creates the node at the
/// same path in the container, so a path elsewhere is a mistake).
fn parse_extra_device(s: &str) -> Result<PathBuf, String> {
    let p = Path::new(s);
    if !p.starts_with("/dev/") || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(format!("{s:?} is not a device node under /dev (like /dev/net/tun)"));
    }
    Ok(p.to_path_buf())
}

/// What the plugin serves and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The kubelet's device plugin directory.
    pub plugin_dir: PathBuf,
    /// The advertised extended resource.
    pub resource_name: ResourceName,
    /// Number of slots, at least 1.
    pub slots: u32,
    /// Where this process checks the device.
    pub device_path: PathBuf,
    /// The device's path on the node, as given to the kubelet in Allocate.
    pub host_device_path: PathBuf,
    /// Further device nodes handed out with the KVM device (same path on the node and in the
    /// container).
    pub extra_devices: Vec<PathBuf>,
    /// Period of the device and socket checks.
    pub health_interval: Duration,
}

impl Config {
    /// The defaults of the command line, with the given directory and device.
    pub fn new(plugin_dir: impl Into<PathBuf>, device_path: impl Into<PathBuf>) -> Self {
        let device_path = device_path.into();
        Config {
            plugin_dir: plugin_dir.into(),
            resource_name: ResourceName(DEFAULT_RESOURCE_NAME.to_owned()),
            slots: DEFAULT_SLOTS,
            host_device_path: device_path.clone(),
            device_path,
            extra_devices: Vec::new(),
            health_interval: DEFAULT_HEALTH_INTERVAL,
        }
    }

    /// File name of the plugin's socket in the plugin directory (`RegisterRequest.endpoint`),
    /// derived from the resource name so that two plugins for different resources never collide:
    /// `devices.lockstep.dev/kvm` serves on `devices.lockstep.dev_kvm.sock`.
    pub fn endpoint(&self) -> String {
        format!("{}.sock", self.resource_name.as_str().replace('/', "_"))
    }

    /// Full path of the plugin's socket.
    pub fn socket_path(&self) -> PathBuf {
        self.plugin_dir.join(self.endpoint())
    }

    /// Full path of the kubelet's registration socket.
    pub fn kubelet_socket(&self) -> PathBuf {
        self.plugin_dir.join(api::KUBELET_SOCKET)
    }
}

/// An extended resource name the kubelet accepts from a device plugin: `DOMAIN/NAME`, where
/// `requests.DOMAIN/NAME` is a Kubernetes qualified name and the domain is not `kubernetes.io`
/// (the kubelet's `IsExtendedResourceName`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceName(String);

/// Why a resource name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceNameError {
    /// No `/`.
    #[error("resource name {0:?} has no domain; use DOMAIN/NAME, e.g. {DEFAULT_RESOURCE_NAME}")]
    NoDomain(String),
    /// In the reserved Kubernetes namespace.
    #[error(
        "resource name {0:?} is in the reserved kubernetes.io domain; use your own domain, e.g. {DEFAULT_RESOURCE_NAME}"
    )]
    Reserved(String),
    /// Domain is not a lowercase DNS subdomain.
    #[error(
        "resource name {0:?}: the domain must be a lowercase DNS name (letters, digits, '-' and '.', \
         starting and ending with a letter or digit, at most 244 characters)"
    )]
    BadDomain(String),
    /// Name part is not a qualified-name part.
    #[error(
        "resource name {0:?}: the part after '/' must be 1 to 63 letters, digits, '-', '_' or '.', \
         starting and ending with a letter or digit"
    )]
    BadName(String),
}

impl ResourceName {
    /// Checks `name` the way the kubelet's `Register` does.
    pub fn parse(name: &str) -> Result<Self, ResourceNameError> {
        let owned = || name.to_owned();
        let Some((domain, local)) = name.split_once('/') else {
            return Err(ResourceNameError::NoDomain(owned()));
        };
        if name.contains("kubernetes.io/") {
            return Err(ResourceNameError::Reserved(owned()));
        }
        // The kubelet validates `requests.` + name as a qualified name, so the usable domain is
        // 253 minus the 9 characters of that prefix; a domain starting with `requests.` is
        // reserved for quota.
        if domain.starts_with("requests.") || !is_dns_subdomain(&format!("requests.{domain}")) {
            return Err(ResourceNameError::BadDomain(owned()));
        }
        if !is_qualified_name_part(local) {
            return Err(ResourceNameError::BadName(owned()));
        }
        Ok(ResourceName(name.to_owned()))
    }

    /// The name as sent to the kubelet.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// RFC 1123 subdomain as Kubernetes checks it: at most 253 characters, dot-separated labels of
/// lowercase letters, digits and '-', each starting and ending with a letter or digit.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-'
        })
}

/// The name part of a Kubernetes qualified name: 1 to 63 of `[A-Za-z0-9_.-]`, starting and ending
/// with an alphanumeric character.
fn is_qualified_name_part(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn accepts_extended_resource_names() {
        for name in [DEFAULT_RESOURCE_NAME, "devices.kubevirt.io/kvm", "example.com/kvm_2.x", "a/b"] {
            assert_eq!(ResourceName::parse(name).map(|n| n.to_string()), Ok(name.to_owned()));
        }
    }

    #[test]
    fn refuses_what_the_kubelet_refuses() {
        use ResourceNameError::*;
        type Case = (&'static str, fn(String) -> ResourceNameError);
        let cases: &[Case] = &[
            ("kvm", NoDomain),
            ("kubernetes.io/kvm", Reserved),
            ("devices.kubernetes.io/kvm", Reserved),
            ("requests.example.com/kvm", BadDomain),
            ("Example.com/kvm", BadDomain),
            ("-example.com/kvm", BadDomain),
            ("example..com/kvm", BadDomain),
            ("/kvm", BadDomain),
            ("example.com/", BadName),
            ("example.com/kvm-", BadName),
            ("example.com/a/b", BadName),
            ("example.com/kvm device", BadName),
        ];
        for (name, variant) in cases {
            assert_eq!(ResourceName::parse(name), Err(variant(name.to_string())), "{name}");
        }
        let long_name = format!("example.com/{}", "k".repeat(64));
        assert!(matches!(ResourceName::parse(&long_name), Err(BadName(_))));
        let long_domain = format!("{}.com/kvm", "d".repeat(241));
        assert!(matches!(ResourceName::parse(&long_domain), Err(BadDomain(_))));
        let longest_domain = format!("{}.com/kvm", "d".repeat(240));
        assert!(ResourceName::parse(&longest_domain).is_ok());
    }

    #[test]
    fn endpoint_is_derived_from_the_resource_name() {
        let mut config = Config::new("/plugins", "/dev/kvm");
        assert_eq!(config.endpoint(), "devices.lockstep.dev_kvm.sock");
        assert_eq!(config.socket_path(), Path::new("/plugins/devices.lockstep.dev_kvm.sock"));
        assert_eq!(config.kubelet_socket(), Path::new("/plugins/kubelet.sock"));
        config.resource_name = ResourceName::parse("devices.kubevirt.io/kvm").unwrap();
        assert_eq!(config.endpoint(), "devices.kubevirt.io_kvm.sock");
    }

    #[test]
    fn command_line_defaults_and_host_path() {
        let cli = Cli::try_parse_from(["lockstep-device-plugin"]).unwrap();
        assert_eq!(cli.config(), Config::new(api::DEFAULT_PLUGIN_DIR, "/dev/kvm"));
        assert_eq!(cli.log_format, LogFormat::Text);

        let cli = Cli::try_parse_from([
            "lockstep-device-plugin",
            "--device-path=/host/dev/kvm",
            "--host-device-path=/dev/kvm",
            "--slots=3",
            "--health-interval-ms=250",
            "--log-format=json",
            "--also-device=/dev/net/tun",
        ])
        .unwrap();
        let config = cli.config();
        assert_eq!(config.extra_devices, [Path::new("/dev/net/tun")]);
        assert_eq!(config.device_path, Path::new("/host/dev/kvm"));
        assert_eq!(config.host_device_path, Path::new("/dev/kvm"));
        assert_eq!(config.slots, 3);
        assert_eq!(config.health_interval, Duration::from_millis(250));
        assert_eq!(cli.log_format, LogFormat::Json);
    }

    #[test]
    fn command_line_refuses_bad_values() {
        for args in [
            &["--slots=0"][..],
            &["--also-device=/etc/shadow"],
            &["--also-device=/dev/../etc/shadow"],
            &["--also-device=net/tun"],
            &["--slots=4097"],
            &["--health-interval-ms=0"],
            &["--resource-name=kvm"],
            &["--log-format=xml"],
        ] {
            let argv = std::iter::once("lockstep-device-plugin").chain(args.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{args:?} should be refused");
        }
    }
}
