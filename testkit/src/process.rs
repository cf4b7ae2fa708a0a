//! A child process (usually `lockstep-agent`) whose stderr a test can wait on.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A running child with its stderr echoed to the test's (each line as `  [tag] line`, so the
/// output of several agents stays readable) and searchable with [`AgentProcess::wait_line`].
///
/// Dropping it kills (`SIGKILL`) and reaps the child, also while a failing test unwinds.
#[derive(Debug)]
pub struct AgentProcess {
    tag: String,
    child: Child,
    lines: Receiver<String>,
}

impl AgentProcess {
    /// Spawns `cmd` the way tests run agents: `LOCKSTEP_LOG=warn` unless `cmd` sets it, stdout
    /// discarded, stderr taken over.
    pub fn spawn(tag: &str, cmd: &mut Command) -> AgentProcess {
        if !cmd.get_envs().any(|(k, _)| k == "LOCKSTEP_LOG") {
            cmd.env("LOCKSTEP_LOG", "warn");
        }
        Self::spawn_as_is(tag, cmd.stdout(Stdio::null()))
    }

    /// Spawns `cmd` with its stdout and environment as the caller set them (e.g. stdout piped
    /// to read a summary through [`AgentProcess::child`]); only stderr is taken over.
    pub fn spawn_as_is(tag: &str, cmd: &mut Command) -> AgentProcess {
        let mut child = cmd
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {tag} ({:?}): {e}", cmd.get_program()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        let echo = tag.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("  [{echo}] {line}");
                // The test may have stopped listening; the echo goes on regardless.
                let _ = tx.send(line);
            }
        });
        AgentProcess { tag: tag.to_string(), child, lines }
    }

    /// The name its lines are tagged with.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The child itself, for what this type does not cover (its stdout, other signals).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits until a stderr line contains `needle` and returns that line; lines before it are
    /// consumed. Panics, naming the process, after `timeout` or when its stderr closes first.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{} never said {needle:?} within {timeout:?}", self.tag)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("{} never said {needle:?}: its stderr closed (did it exit?)", self.tag)
                }
            }
        }
    }

    /// Every stderr line not consumed yet, until its stderr closes (it exited) or `timeout`
    /// passes: for asserting what a process did *not* say.
    pub fn remaining_lines(&self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            lines.push(line);
        }
        lines
    }

    /// `kill -9`, and reap it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// How it exited, if it has (without waiting).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap_or_else(|e| panic!("cannot poll {}: {e}", self.tag))
    }

    /// Its exit code once it exits by itself within `timeout` (a zero timeout just looks);
    /// `None` while it runs, and for a child ended by a signal.
    pub fn exit_code(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::path::Path;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn wait_line_skips_to_the_matching_line_and_returns_it() {
        let p = AgentProcess::spawn(
            "chatty",
            &mut sh("echo one >&2; echo 'two: ready at 1' >&2; echo three >&2; exec sleep 5"),
        );
        assert_eq!(p.wait_line("ready", Duration::from_secs(10)), "two: ready at 1");
        assert_eq!(p.wait_line("three", Duration::from_secs(10)), "three");
    }

    #[test]
    #[should_panic(expected = "sleepy never said \"hello\" within 200ms")]
    fn wait_line_times_out_naming_the_process() {
        let p = AgentProcess::spawn("sleepy", &mut sh("echo other >&2; exec sleep 30"));
        p.wait_line("hello", Duration::from_millis(200));
    }

    #[test]
    #[should_panic(expected = "quitter never said \"hello\": its stderr closed")]
    fn wait_line_fails_at_once_when_the_process_is_gone() {
        let p = AgentProcess::spawn("quitter", &mut sh("echo bye >&2"));
        let t = Instant::now();
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.wait_line("hello", Duration::from_secs(30))));
        assert!(t.elapsed() < Duration::from_secs(10), "waited the whole timeout for a dead process");
        std::panic::resume_unwind(r.unwrap_err());
    }

    #[test]
    fn spawn_sets_a_quiet_log_level_unless_the_command_has_one() {
        let p = AgentProcess::spawn("env", &mut sh("echo \"log=$LOCKSTEP_LOG\" >&2; exec sleep 5"));
        assert_eq!(p.wait_line("log=", Duration::from_secs(10)), "log=warn");
        let p =
            AgentProcess::spawn("env", sh("echo \"log=$LOCKSTEP_LOG\" >&2; exec sleep 5").env("LOCKSTEP_LOG", "debug"));
        assert_eq!(p.wait_line("log=", Duration::from_secs(10)), "log=debug");
    }

    #[test]
    fn spawn_as_is_leaves_stdout_to_the_caller() {
        let mut p = AgentProcess::spawn_as_is("summary", sh("echo '{\"ok\":1}'; echo done >&2").stdout(Stdio::piped()));
        p.wait_line("done", Duration::from_secs(10));
        let mut out = String::new();
        p.child().stdout.take().unwrap().read_to_string(&mut out).unwrap();
        assert_eq!(out, "{\"ok\":1}\n");
    }

    #[test]
    fn exit_code_waits_for_the_exit_and_is_none_while_running_or_killed() {
        let mut done = AgentProcess::spawn("exit3", &mut sh("sleep 0.2; exit 3"));
        assert_eq!(done.exit_code(Duration::from_secs(10)), Some(3));
        let mut running = AgentProcess::spawn("runner", &mut sh("exec sleep 30"));
        let t = Instant::now();
        assert_eq!(running.exit_code(Duration::from_millis(300)), None);
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert_eq!(running.exit_code(Duration::ZERO), None);
        running.kill9();
        let status = running.try_status().expect("reaped by kill9");
        assert_eq!(status.code(), None, "ended by SIGKILL, not an exit code");
    }

    #[test]
    fn drop_kills_and_reaps_the_child() {
        let p = AgentProcess::spawn("doomed", &mut sh("exec sleep 30"));
        let proc_dir = format!("/proc/{}", p.child.id());
        assert!(Path::new(&proc_dir).exists());
        drop(p);
        // A zombie would keep its /proc entry: gone means killed and reaped.
        assert!(!Path::new(&proc_dir).exists(), "the child outlived its AgentProcess");
    }
}
