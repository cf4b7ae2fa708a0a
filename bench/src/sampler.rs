//! Scrapes agents' `/metrics` every 100 ms in the background, keeping timed samples.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::prom::{self, Scrape};

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// One scrape of one target.
#[derive(Debug, Clone)]
pub struct Point {
    /// Seconds since the sampler started.
    pub t: f64,
    /// Wall clock (Unix seconds) when the answer arrived.
    pub unix: f64,
    pub target: String,
    pub scrape: Scrape,
}

#[derive(Debug)]
pub struct Sampler {
    pub started: Instant,
    points: Arc<Mutex<Vec<Point>>>,
    targets: Arc<Mutex<Vec<(String, SocketAddr)>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(period: Duration) -> Sampler {
        let started = Instant::now();
        let points = Arc::new(Mutex::new(Vec::new()));
        let targets: Arc<Mutex<Vec<(String, SocketAddr)>>> = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (pts, tgs, sp) = (points.clone(), targets.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut next = Instant::now();
            while !sp.load(Ordering::Relaxed) {
                let list = tgs.lock().unwrap_or_else(|e| e.into_inner()).clone();
                for (name, addr) in list {
                    // A dead target (killed primary) just yields no point.
                    if let Ok(scrape) = prom::scrape(addr) {
                        let p = Point { t: started.elapsed().as_secs_f64(), unix: unix_now(), target: name, scrape };
                        pts.lock().unwrap_or_else(|e| e.into_inner()).push(p);
                    }
                }
                next += period;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
        });
        Sampler { started, points, targets, stop, handle: Some(handle) }
    }

    pub fn add(&self, name: &str, addr: SocketAddr) {
        self.targets.lock().unwrap_or_else(|e| e.into_inner()).push((name.into(), addr));
    }

    pub fn remove(&self, name: &str) {
        self.targets.lock().unwrap_or_else(|e| e.into_inner()).retain(|(n, _)| n != name);
    }

    /// Seconds since the sampler started.
    pub fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// `(t, value)` of `metric` on `target`.
    pub fn series(&self, target: &str, metric: &str) -> Vec<(f64, f64)> {
        self.points
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|p| p.target == target)
            .filter_map(|p| p.scrape.get(metric).map(|v| (p.t, v)))
            .collect()
    }

    /// `(unix time, value)` of `metric` on `target`.
    pub fn series_unix(&self, target: &str, metric: &str) -> Vec<(f64, f64)> {
        self.points
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|p| p.target == target)
            .filter_map(|p| p.scrape.get(metric).map(|v| (p.unix, v)))
            .collect()
    }

    /// Every point of `target` with `t` in `[t0, t1]`.
    pub fn points(&self, target: &str, t0: f64, t1: f64) -> Vec<Point> {
        self.points
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|p| p.target == target && p.t >= t0 && p.t <= t1)
            .cloned()
            .collect()
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop();
    }
}
