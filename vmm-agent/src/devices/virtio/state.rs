//! Saved state of the virtio-mmio transport: its registers and each queue's position.

use virtio_queue::{Queue, QueueState};

use super::{VirtioDevice, VirtioMmio};
use crate::snapshot::{Decoder, Encoder, Persist, Result, SnapshotError};

/// The transport registers the driver wrote, and every queue as virtio-queue describes it
/// (`QueueState`: sizes, ring addresses, ready, next avail/used). The rings themselves are in
/// guest memory, which travels separately.
///
/// virtio-queue also keeps `num_added`, which only matters with `VIRTIO_F_EVENT_IDX`; our devices
/// never offer it, so `QueueState` is the whole queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueState>,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// The transport's state (the device behind it saves its own).
    pub fn save(&self) -> TransportState {
        TransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(Queue::state).collect(),
        }
    }

    /// Put the transport where `s` says. The queue layout must be this device's.
    pub fn restore(&mut self, s: &TransportState) -> Result<()> {
        let sizes = self.device.queue_sizes();
        if s.queues.len() != sizes.len() {
            return Err(SnapshotError::Mismatch(format!(
                "device type {} has {} queues, the saved transport {}",
                D::DEVICE_TYPE,
                sizes.len(),
                s.queues.len()
            )));
        }
        let mut queues = Vec::with_capacity(sizes.len());
        for (i, (q, &max)) in s.queues.iter().zip(sizes).enumerate() {
            if q.max_size != max {
                return Err(SnapshotError::Mismatch(format!(
                    "queue {i} of device type {} has {max} entries, the saved one {}",
                    D::DEVICE_TYPE,
                    q.max_size
                )));
            }
            if q.event_idx_enabled {
                return Err(SnapshotError::Invalid(format!(
                    "queue {i} has EVENT_IDX on, which this device never offers"
                )));
            }
            let queue = Queue::try_from(*q)
                .map_err(|e| SnapshotError::Invalid(format!("queue {i} of device type {}: {e}", D::DEVICE_TYPE)))?;
            queues.push(queue);
        }
        self.queues = queues;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        Ok(())
    }
}

impl Persist for QueueState {
    fn encode(&self, e: &mut Encoder) {
        e.u16(self.max_size);
        e.u16(self.next_avail);
        e.u16(self.next_used);
        e.bool(self.event_idx_enabled);
        e.u16(self.size);
        e.bool(self.ready);
        e.u64(self.desc_table);
        e.u64(self.avail_ring);
        e.u64(self.used_ring);
    }

    fn decode(d: &mut Decoder<'_>) -> Result<Self> {
        Ok(QueueState {
            max_size: d.u16("queue max size")?,
            next_avail: d.u16("queue next avail")?,
            next_used: d.u16("queue next used")?,
            event_idx_enabled: d.bool("queue event idx")?,
            size: d.u16("queue size")?,
            ready: d.bool("queue ready")?,
            desc_table: d.u64("queue descriptor table")?,
            avail_ring: d.u64("queue avail ring")?,
            used_ring: d.u64("queue used ring")?,
        })
    }
}

/// Encoded size of one queue, for bounding list counts.
pub(crate) const QUEUE_STATE_LEN: usize = 2 + 2 + 2 + 1 + 2 + 1 + 8 * 3;

impl Persist for TransportState {
    fn encode(&self, e: &mut Encoder) {
        e.u32(self.device_features_sel);
        e.u32(self.driver_features_sel);
        e.u64(self.driver_features);
        e.u32(self.queue_sel);
        e.u32(self.status);
        e.u32(self.interrupt_status);
        e.u32(self.config_generation);
        e.list(&self.queues);
    }

    fn decode(d: &mut Decoder<'_>) -> Result<Self> {
        Ok(TransportState {
            device_features_sel: d.u32("virtio device features select")?,
            driver_features_sel: d.u32("virtio driver features select")?,
            driver_features: d.u64("virtio driver features")?,
            queue_sel: d.u32("virtio queue select")?,
            status: d.u32("virtio status")?,
            interrupt_status: d.u32("virtio interrupt status")?,
            config_generation: d.u32("virtio config generation")?,
            queues: d.list(QUEUE_STATE_LEN, "virtio queues")?,
        })
    }
}
