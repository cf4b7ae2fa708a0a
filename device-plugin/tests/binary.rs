//! The `lockstep-device-plugin` binary as the DaemonSet runs it: signals, log formats, flags, and
//! an unprivileged container's devices cgroup refusing `/dev/kvm`.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep_device_plugin::api::v1beta1::{AllocateRequest, ContainerAllocateRequest, Empty};
use support::{FakeKubelet, WAIT, dial_plugin, next_list, uniform_health, wait_until, within};

const BIN: &str = env!("CARGO_BIN_EXE_lockstep-device-plugin");
const SOCKET: &str = "devices.lockstep.dev_kvm.sock";

/// A child process, with its stderr collected line by line; killed if the test fails before it
/// exits.
struct Plugin {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Plugin {
    fn spawn(command: &mut Command) -> Plugin {
        let mut child =
            command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start lockstep-device-plugin");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = BufReader::new(child.stderr.take().unwrap());
        let lines = Arc::clone(&stderr);
        let reader = std::thread::spawn(move || {
            for line in pipe.lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Plugin { child, stderr, reader: Some(reader) }
    }

    /// Waits until a line of stderr contains `needle`.
    async fn logged(&self, needle: &str) {
        let stderr = Arc::clone(&self.stderr);
        wait_until(&format!("{needle:?} in the plugin's log"), || {
            stderr.lock().unwrap().iter().any(|l| l.contains(needle))
        })
        .await;
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with the pid of our own child, which has not been reaped (we still own
        // the `Child`), so the pid cannot name another process.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the exit and returns its status and everything it wrote to stderr.
    async fn exit(mut self) -> (ExitStatus, String) {
        let status = within(WAIT, "the plugin to exit", async {
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        // The pipe closes with the process, so the reader finishes.
        self.reader.take().unwrap().join().unwrap();
        let stderr = self.stderr.lock().unwrap().join("\n");
        (status, stderr)
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn plugin_command(dir: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.arg("--plugin-dir").arg(dir).args(["--slots=2", "--health-interval-ms=50"]).args(extra);
    command.env_remove("RUST_LOG");
    command
}

#[tokio::test]
async fn sigterm_removes_the_socket_and_exits_zero_with_plain_text_logs() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = FakeKubelet::start(dir.path()).await;
    let plugin = Plugin::spawn(&mut plugin_command(dir.path(), &[]));
    assert_eq!(kubelet.next_registration().await.endpoint, SOCKET);
    assert!(dir.path().join(SOCKET).exists());
    plugin.logged("registered with the kubelet").await;

    plugin.signal(libc::SIGTERM);
    let (status, stderr) = plugin.exit().await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!dir.path().join(SOCKET).exists(), "socket removed");
    assert!(stderr.contains("registered with the kubelet"), "{stderr}");
    assert!(stderr.contains("SIGTERM received"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "no colour codes when stderr is not a terminal: {stderr:?}");
}

#[tokio::test]
async fn sigint_exits_zero_and_json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = FakeKubelet::start(dir.path()).await;
    let plugin = Plugin::spawn(&mut plugin_command(dir.path(), &["--log-format=json"]));
    kubelet.next_registration().await;
    plugin.logged("registered with the kubelet").await;

    plugin.signal(libc::SIGINT);
    let (status, stderr) = plugin.exit().await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!dir.path().join(SOCKET).exists(), "socket removed");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    // Event fields are flattened into the object (lockstep-logging), as collectors expect.
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    assert!(messages.contains(&"registered with the kubelet"), "{messages:?}");
    assert!(messages.contains(&"SIGINT received: removing the socket and exiting"), "{messages:?}");
    let registered = lines.iter().find(|l| l["message"] == "registered with the kubelet").unwrap();
    assert_eq!(registered["resource"], "devices.lockstep.dev/kvm");
    assert_eq!(registered["level"], "INFO");
}

#[tokio::test]
async fn bad_flags_exit_2_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, reason) in
        [("--slots=0", "--slots"), ("--resource-name=kvm", "has no domain"), ("--log-format=xml", "--log-format")]
    {
        let output = plugin_command(dir.path(), &[flag]).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{flag}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(reason), "{flag}: {stderr}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing created");
}

/// A devices cgroup (v1) that denies `/dev/kvm`, like the one of an unprivileged container;
/// removed on drop.
struct DeniedKvmCgroup(PathBuf);

impl DeniedKvmCgroup {
    fn create() -> DeniedKvmCgroup {
        let root = Path::new("/sys/fs/cgroup/devices");
        assert!(
            root.join("devices.deny").exists(),
            "this test needs the cgroup v1 devices controller at {} (as on the project's machines) to \
             reproduce an unprivileged container's EPERM",
            root.display()
        );
        let path = root.join(format!("lockstep-device-plugin-test-{}", std::process::id()));
        std::fs::create_dir(&path).expect("create a devices cgroup");
        let cgroup = DeniedKvmCgroup(path);
        std::fs::write(cgroup.0.join("devices.deny"), "c 10:232 rwm").expect("deny /dev/kvm");
        cgroup
    }
}

impl Drop for DeniedKvmCgroup {
    fn drop(&mut self) {
        // Fails only while a process is still inside; the plugin has exited or been killed.
        if let Err(e) = std::fs::remove_dir(&self.0) {
            eprintln!("cannot remove {}: {e}", self.0.display());
        }
    }
}

#[tokio::test]
async fn a_devices_cgroup_refusing_kvm_still_counts_as_healthy() {
    let cgroup = DeniedKvmCgroup::create();
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = FakeKubelet::start(dir.path()).await;
    // The shell joins the cgroup, then becomes the plugin, so the plugin never runs outside it.
    let join = format!("echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"", cgroup.0.display());
    let mut command = Command::new("sh");
    command
        .args(["-c", &join, BIN, "--plugin-dir"])
        .arg(dir.path())
        .args(["--slots=2", "--health-interval-ms=50"])
        .env_remove("RUST_LOG");
    let plugin = Plugin::spawn(&mut command);
    kubelet.next_registration().await;

    let mut client = dial_plugin(&dir.path().join(SOCKET)).await;
    let mut devices = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(uniform_health(&next_list(&mut devices).await, 2), "Healthy");
    let request =
        AllocateRequest { container_requests: vec![ContainerAllocateRequest { devices_ids: vec!["kvm-1".into()] }] };
    let allocated = client.allocate(request).await.unwrap().into_inner();
    assert_eq!(allocated.container_responses[0].devices[0].host_path, "/dev/kvm");

    plugin.signal(libc::SIGTERM);
    let (status, stderr) = plugin.exit().await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    let explained: Vec<&str> = stderr.lines().filter(|l| l.contains("may not open it")).collect();
    assert_eq!(explained.len(), 1, "one line explains the refused open: {stderr}");
    assert!(explained[0].contains("Operation not permitted"), "{stderr}");
    assert!(explained[0].contains("health=\"Healthy\""), "{stderr}");
}
