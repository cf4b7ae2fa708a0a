//! The VM's own network interface (docs/network.md): TCP throughput into and out of the guest,
//! plain VM against FT pair, what the log costs per byte received, and the longest stall a
//! connected client sees across a failover.
//!
//! The bench builds a layer-2 network of its own (a bridge with a TAP per replica, as
//! `up --l2` does, under other names and another subnet so it never meets a user's) and talks to
//! the guest's TCP/IP stack from this host. Needs root or CAP_NET_ADMIN.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lockstep_agent::nic::{L2Config, L2Network, format_mac};
use serde::Serialize;

use crate::agents::{Env, Guest, PairSpec, Ports, Replica};
use crate::procs::Proc;
use crate::prom;
use crate::resp::{Reply, Resp};

/// One value of the bulk transfers: big enough that a transfer is many TCP windows, small
/// enough for the guest's query buffer limit.
const VALUE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Default, Serialize)]
pub struct NetworkFigures {
    /// Bytes moved each way per mode (`VALUE_BYTES` × values).
    pub transfer_bytes: u64,
    /// Payload Mbit/s of `SET` of 1 MiB values (into the guest) and of `GET` (out of it).
    pub plain_in_mbps: Option<f64>,
    pub plain_out_mbps: Option<f64>,
    pub ft_in_mbps: Option<f64>,
    pub ft_out_mbps: Option<f64>,
    /// The FT pair's log bits per bit the VM received from the network (frames, headers
    /// included), in each transfer.
    pub ft_log_per_received_in: Option<f64>,
    pub ft_log_per_received_out: Option<f64>,
    /// The log's bandwidth during each transfer.
    pub ft_log_mbps_in: Option<f64>,
    pub ft_log_mbps_out: Option<f64>,
    /// Longest gap between two replies of a client that sends INCR back to back on one
    /// connection, across each `kill -9` of the primary (milliseconds).
    pub failover_stall_ms: Vec<f64>,
    /// Connections that broke (reset or closed) during the failovers: the promise is zero.
    pub broken_connections: u32,
}

impl NetworkFigures {
    pub fn summary(&self) -> String {
        let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        format!(
            "VM address: in plain {} / FT {} Mbit/s, out plain {} / FT {} Mbit/s; failover stalls {:?} ms, {} broken connections",
            f(self.plain_in_mbps),
            f(self.ft_in_mbps),
            f(self.plain_out_mbps),
            f(self.ft_out_mbps),
            self.failover_stall_ms.iter().map(|v| v.round()).collect::<Vec<_>>(),
            self.broken_connections
        )
    }

    pub fn markdown(&self) -> String {
        let v = |x: Option<f64>| x.map_or("not measured".into(), |x| format!("{x:.1}"));
        let r = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
            _ => "-".into(),
        };
        let mut m = String::from("\n## The VM's own address: TCP through the guest's stack (docs/network.md)\n\n");
        m.push_str(&format!(
            "One connection from this host to the guest's TCP/IP stack over a bridge and TAP devices, moving {} MiB each \
             way in 1 MiB values (`SET` into the guest, `GET` out of it). Payload Mbit/s; the FT pair's channel is plain \
             TCP like the other FT rows.\n\n",
            self.transfer_bytes >> 20
        ));
        m.push_str("| direction | plain VM | FT pair | FT / plain | log bits per bit received | log Mbit/s |\n");
        m.push_str("|---|---|---|---|---|---|\n");
        m.push_str(&format!(
            "| into the guest | {} | {} | {} | {} | {} |\n",
            v(self.plain_in_mbps),
            v(self.ft_in_mbps),
            ratio(self.ft_in_mbps, self.plain_in_mbps),
            r(self.ft_log_per_received_in),
            v(self.ft_log_mbps_in)
        ));
        m.push_str(&format!(
            "| out of the guest | {} | {} | {} | {} | {} |\n",
            v(self.plain_out_mbps),
            v(self.ft_out_mbps),
            ratio(self.ft_out_mbps, self.plain_out_mbps),
            r(self.ft_log_per_received_out),
            v(self.ft_log_mbps_out)
        ));
        if !self.failover_stall_ms.is_empty() {
            let max = self.failover_stall_ms.iter().cloned().fold(0.0, f64::max);
            m.push_str(&format!(
                "\nA client sending INCR back to back on one connection while the primary is killed with `kill -9` \
                 ({} times, a new backup cloned in between): longest stall per failover {} ms, worst {max:.0} ms; \
                 {} connections broke.\n",
                self.failover_stall_ms.len(),
                self.failover_stall_ms.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", "),
                self.broken_connections
            ));
        }
        m
    }
}

/// The bench's network: prefix `lsbn`, 10.124.0.0/24.
fn network() -> Result<(L2Network, L2Config)> {
    let mut cfg = L2Config::for_prefix("lsbn");
    cfg.host_cidr = (Ipv4Addr::new(10, 124, 0, 1), 24);
    cfg.vm_ip = Ipv4Addr::new(10, 124, 0, 2);
    let net = L2Network::create(&cfg).context("creating the bench's layer-2 network (root or CAP_NET_ADMIN)")?;
    Ok((net, cfg))
}

fn vm_args(cfg: &L2Config, tap: &str) -> Vec<String> {
    vec![
        "--vm-ip".into(),
        format!("{}/{}", cfg.vm_ip, cfg.host_cidr.1),
        "--vm-mac".into(),
        format_mac(cfg.vm_mac),
        "--tap".into(),
        tap.into(),
    ]
}

/// Moves `values` values of 1 MiB into the guest (`SET`) or out of it (`GET`) on `c`; returns
/// the payload Mbit/s.
fn move_values(c: &mut Resp, into: bool, values: usize) -> Result<f64> {
    let value: String = "v".repeat(VALUE_BYTES);
    let t = Instant::now();
    for i in 0..values {
        let key = format!("bulk-{}", i % 4);
        if into {
            match c.cmd(&["SET", &key, &value])? {
                Reply::Simple(s) if s == "OK" => {}
                other => bail!("SET of 1 MiB answered {other:?}"),
            }
        } else {
            match c.cmd(&["GET", &key])? {
                Reply::Bulk(Some(b)) if b.len() == VALUE_BYTES => {}
                other => bail!("GET of a 1 MiB value answered {:?}", other.text().map(|t| t.len())),
            }
        }
    }
    Ok((values * VALUE_BYTES * 8) as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// Moves `values` values into the guest and back out on one connection; returns the payload
/// Mbit/s of each direction.
fn transfer(vm: SocketAddr, values: usize) -> Result<(f64, f64)> {
    let mut c = Resp::connect(vm, Duration::from_secs(60))?;
    let into = move_values(&mut c, true, values)?;
    Ok((into, move_values(&mut c, false, values)?))
}

/// [`transfer`] on an FT pair, with the primary's log counters read around each direction.
fn ft_transfer(vm: SocketAddr, metrics: SocketAddr, values: usize, f: &mut NetworkFigures) -> Result<()> {
    let mut c = Resp::connect(vm, Duration::from_secs(60))?;
    let mut direction = |into: bool| -> Result<(f64, f64, f64)> {
        let before = prom::scrape(metrics)?;
        let t = Instant::now();
        let mbps = move_values(&mut c, into, values)?;
        let secs = t.elapsed().as_secs_f64();
        let after = prom::scrape(metrics)?;
        let delta = |name: &str| after.get(name).unwrap_or(0.0) - before.get(name).unwrap_or(0.0);
        let (log, received) = (delta("lockstep_log_bytes_sent_total"), delta("lockstep_client_bytes_received_total"));
        Ok((mbps, if received > 0.0 { log / received } else { f64::NAN }, log * 8.0 / secs / 1e6))
    };
    let (mbps, per, log) = direction(true)?;
    (f.ft_in_mbps, f.ft_log_per_received_in, f.ft_log_mbps_in) = (Some(mbps), Some(per), Some(log));
    let (mbps, per, log) = direction(false)?;
    (f.ft_out_mbps, f.ft_log_per_received_out, f.ft_log_mbps_out) = (Some(mbps), Some(per), Some(log));
    Ok(())
}

pub fn measure(env: &Env, quick: bool) -> Result<NetworkFigures> {
    let (net, cfg) = network()?;
    let [t0, t1] = net.tap_names().map(str::to_string);
    let vm = SocketAddr::from((cfg.vm_ip, 6379));
    let values = if quick { 16 } else { 64 };
    let mut f = NetworkFigures { transfer_bytes: (values * VALUE_BYTES) as u64, ..Default::default() };

    // A plain VM on the first TAP.
    let ports = Ports::new()?;
    let mut args: Vec<String> =
        ["run", "--guest", "kvstore", "--quiet", "--vm-id", "net-plain"].iter().map(|s| s.to_string()).collect();
    args.extend(["--client-listen".into(), ports.client.to_string()]);
    args.extend(vm_args(&cfg, &t0));
    let mut cmd = std::process::Command::new(&env.agent);
    cmd.args(&args).env("LOCKSTEP_LOG", "info");
    let mut plain = Proc::spawn("net-plain", cmd, env.verbose)?;
    Resp::wait_ready(vm, Duration::from_secs(60)).context("the plain VM's address never answered")?;
    let (into, out) = transfer(vm, values)?;
    (f.plain_in_mbps, f.plain_out_mbps) = (Some(into), Some(out));
    let _ = plain.terminate(Duration::from_secs(20));

    // An FT pair: primary on the first TAP, backup on the second.
    let spec = PairSpec::new(env, "net-ft", Guest::Kvstore, 64);
    let primary = spec.primary_with(env, "net-primary", &vm_args(&cfg, &t0))?;
    let backup = spec.backup_with(
        env,
        "net-backup-0",
        primary.ports.channel,
        Duration::from_secs(120),
        &["--tap".into(), t1.clone()],
    )?;
    Resp::wait_ready(vm, Duration::from_secs(60)).context("the FT pair's address never answered")?;
    ft_transfer(vm, primary.ports.metrics, values, &mut f)?;

    // Failovers under a connected client.
    let kills = if quick { 2 } else { 5 };
    failovers(env, &spec, vm, primary, backup, [t0, t1], kills, &mut f)?;
    drop(net);
    Ok(f)
}

/// Kill the primary `kills` times while one client sends INCR back to back; after each, clone a
/// new backup in on the dead primary's TAP. Records the longest gap between replies per kill.
#[allow(clippy::too_many_arguments)]
fn failovers(
    env: &Env,
    spec: &PairSpec,
    vm: SocketAddr,
    mut primary: Replica,
    mut backup: Replica,
    taps: [String; 2],
    kills: usize,
    f: &mut NetworkFigures,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let gaps = Arc::new(std::sync::Mutex::new(Vec::<(Instant, Duration)>::new()));
    let client = {
        let (stop, gaps) = (stop.clone(), gaps.clone());
        std::thread::spawn(move || -> Result<()> {
            let mut c = Resp::connect(vm, Duration::from_secs(30))?;
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                match c.cmd(&["INCR", "failover-client"])? {
                    Reply::Int(_) => {}
                    other => bail!("INCR answered {other:?}"),
                }
                let now = Instant::now();
                gaps.lock().unwrap().push((now, now - last));
                last = now;
            }
            Ok(())
        })
    };
    // `primary` holds taps[0], `backup` taps[1]; they swap at every failover.
    let mut primary_tap = 0;
    for k in 0..kills {
        std::thread::sleep(Duration::from_secs(1));
        let killed_at = primary.proc.kill9();
        backup.proc.wait_line("going live", Duration::from_secs(30))?;
        // The stall is over once replies flow again: wait for a good number after the kill.
        let deadline = Instant::now() + Duration::from_secs(30);
        let after = |g: &Vec<(Instant, Duration)>| g.iter().filter(|(at, _)| *at >= killed_at).count();
        while after(&gaps.lock().unwrap()) < 50 {
            if Instant::now() > deadline || client.is_finished() {
                f.broken_connections += 1;
                bail!("the client got no replies within 30 s of kill number {}", k + 1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let stall = gaps
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= killed_at)
            .map(|(_, gap)| gap.as_secs_f64() * 1e3)
            .fold(0.0, f64::max);
        f.failover_stall_ms.push(stall);
        // The survivor is the primary now; a new backup takes the dead one's TAP.
        let channel = backup.ports.channel;
        let extra = ["--tap".to_string(), taps[primary_tap].clone()];
        let fresh =
            spec.backup_with(env, &format!("net-backup-{}", k + 1), channel, Duration::from_secs(120), &extra)?;
        primary = std::mem::replace(&mut backup, fresh);
        primary_tap = 1 - primary_tap;
    }
    stop.store(true, Ordering::Relaxed);
    match client.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            f.broken_connections += 1;
            eprintln!("  the failover client's connection broke: {e:#}");
        }
        Err(_) => bail!("the failover client panicked"),
    }
    let _ = backup.proc.terminate(Duration::from_secs(20));
    let _ = primary.proc.terminate(Duration::from_secs(20));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_has_both_directions_and_the_stalls() {
        let f = NetworkFigures {
            transfer_bytes: 64 << 20,
            plain_in_mbps: Some(200.0),
            plain_out_mbps: Some(400.0),
            ft_in_mbps: Some(100.0),
            ft_out_mbps: Some(300.0),
            ft_log_per_received_in: Some(1.04),
            ft_log_per_received_out: Some(3.5),
            ft_log_mbps_in: Some(104.0),
            ft_log_mbps_out: Some(1.0),
            failover_stall_ms: vec![210.0, 480.0],
            broken_connections: 0,
        };
        let m = f.markdown();
        assert!(m.contains("| into the guest | 200.0 | 100.0 | 0.500 | 1.04 | 104.0 |"), "{m}");
        assert!(m.contains("| out of the guest | 400.0 | 300.0 | 0.750 | 3.50 | 1.0 |"), "{m}");
        assert!(m.contains("longest stall per failover 210, 480 ms, worst 480 ms; 0 connections broke"), "{m}");
        let none = NetworkFigures { ft_in_mbps: None, failover_stall_ms: vec![], ..f }.markdown();
        assert!(none.contains("| into the guest | 200.0 | not measured | - |"), "{none}");
        assert!(!none.contains("kill -9"));
    }
}
