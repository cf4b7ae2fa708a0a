//! Saved state of virtio-net: the MAC, the frames still held for the guest and the counters.

use super::{MAX_FRAME, MAX_PENDING, Net};
use crate::snapshot::{Decoder, Encoder, Persist, Result, SnapshotError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetState {
    pub mac: [u8; 6],
    /// Frames from the network not yet in a guest receive buffer, oldest first.
    pub to_guest: Vec<Vec<u8>>,
    pub frames_to_guest: u64,
    pub frames_from_guest: u64,
    pub frames_dropped: u64,
}

impl Net {
    pub fn save(&self) -> NetState {
        NetState {
            mac: self.mac,
            to_guest: self.to_guest.iter().cloned().collect(),
            frames_to_guest: self.frames_to_guest,
            frames_from_guest: self.frames_from_guest,
            frames_dropped: self.frames_dropped,
        }
    }

    /// A device in the state `s` describes (the MAC travels with the state: it is the VM's).
    pub fn restored(s: &NetState) -> Result<Net> {
        if s.to_guest.len() > MAX_PENDING {
            return Err(SnapshotError::Invalid(format!(
                "virtio-net holds {} frames, more than the {MAX_PENDING} a device holds",
                s.to_guest.len()
            )));
        }
        if let Some(f) = s.to_guest.iter().find(|f| f.len() > MAX_FRAME) {
            return Err(SnapshotError::Invalid(format!("virtio-net holds a frame of {} bytes", f.len())));
        }
        Ok(Net {
            mac: s.mac,
            to_guest: s.to_guest.iter().cloned().collect(),
            frames_to_guest: s.frames_to_guest,
            frames_from_guest: s.frames_from_guest,
            frames_dropped: s.frames_dropped,
        })
    }
}

impl Persist for NetState {
    fn encode(&self, e: &mut Encoder) {
        e.bytes(&self.mac);
        e.count(self.to_guest.len());
        for f in &self.to_guest {
            e.bytes(f);
        }
        e.u64(self.frames_to_guest);
        e.u64(self.frames_from_guest);
        e.u64(self.frames_dropped);
    }

    fn decode(d: &mut Decoder<'_>) -> Result<Self> {
        let mac: [u8; 6] = d
            .bytes("virtio-net MAC")?
            .try_into()
            .map_err(|_| SnapshotError::Invalid("virtio-net MAC is not 6 bytes".into()))?;
        let n = d.count(4, "virtio-net held frames")?;
        let mut to_guest = Vec::with_capacity(n.min(MAX_PENDING));
        for _ in 0..n {
            to_guest.push(d.bytes("virtio-net frame")?.to_vec());
        }
        Ok(NetState {
            mac,
            to_guest,
            frames_to_guest: d.u64("virtio-net frames to guest")?,
            frames_from_guest: d.u64("virtio-net frames from guest")?,
            frames_dropped: d.u64("virtio-net frames dropped")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{load, save};

    #[test]
    fn held_frames_round_trip_and_bounds_are_checked() {
        let s = NetState {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            to_guest: vec![vec![1; 60], vec![2; 1514]],
            frames_to_guest: 5,
            frames_from_guest: 6,
            frames_dropped: 1,
        };
        let back: NetState = load(&save(&s)).unwrap();
        assert_eq!(back, s);
        assert_eq!(Net::restored(&back).unwrap().save(), s);

        let big = NetState { to_guest: vec![vec![0; MAX_FRAME + 1]], ..s.clone() };
        assert!(matches!(Net::restored(&big), Err(SnapshotError::Invalid(_))));
        let many = NetState { to_guest: vec![vec![0; 60]; MAX_PENDING + 1], ..s };
        assert!(matches!(Net::restored(&many), Err(SnapshotError::Invalid(_))));
    }
}
