//! virtio-blk on a disk image file. Requests complete at the exit that submitted them, so the
//! backup, executing the same requests at the same exits against its own copy of the disk,
//! keeps an identical disk without any disk data in the log.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_queue::{Queue, QueueT};

use super::{VIRTIO_F_VERSION_1, VirtioDevice};
use crate::devices::{DeviceCtx, DeviceError};

mod state;
pub use state::BlkState;

const SECTOR: u64 = 512;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const F_FLUSH: u64 = 1 << 9;
/// Largest single request we serve (the guest's AOF writes are far smaller).
const MAX_REQUEST: usize = 4 << 20;

/// A disk that lives only as long as this process: an anonymous memory file (`memfd`) of `bytes`
/// bytes, sparse until written. For guests run without `--disk`: it needs no writable file system
/// (agent pods have a read-only root) and leaves nothing behind.
pub fn scratch_disk(bytes: u64) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated name and valid flags; the result is checked before use.
    let fd = unsafe { libc::memfd_create(c"lockstep-scratch-disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(bytes)?;
    Ok(file)
}

#[derive(Debug)]
pub struct Blk {
    disk: File,
    capacity: u64,
    /// Requests served, and bytes moved: part of the deterministic state.
    pub requests: u64,
    pub bytes: u64,
    /// Byte ranges written since a live clone started tracking (not guest-visible state).
    pub written: Option<Vec<(u64, u64)>>,
}

impl Blk {
    pub fn new(disk: File) -> std::io::Result<Self> {
        let capacity = disk.metadata()?.len();
        Ok(Blk { disk, capacity, requests: 0, bytes: 0, written: None })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Serve one request; returns (status, bytes written into guest buffers).
    fn serve(
        &mut self,
        chain: virtio_queue::DescriptorChain<&crate::vmm::memory::GuestMemory>,
        ctx: &DeviceCtx,
    ) -> Result<(u8, u32), DeviceError> {
        let mut reader = match chain.clone().reader(ctx.mem) {
            Ok(r) => r,
            Err(_) => return Ok((S_IOERR, 0)),
        };
        let mut writer = match chain.writer(ctx.mem) {
            Ok(w) => w,
            Err(_) => return Ok((S_IOERR, 0)),
        };
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() || writer.available_bytes() == 0 {
            return Ok((S_IOERR, 0)); // no room for even a status byte: malformed
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().expect("4"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8"));
        let offset = sector.checked_mul(SECTOR);
        let data_room = writer.available_bytes() - 1;
        let (status, written) = match kind {
            T_IN => {
                let len = data_room.min(MAX_REQUEST);
                match offset.filter(|o| o + len as u64 <= self.capacity) {
                    None => (S_IOERR, 0),
                    Some(off) => {
                        let mut buf = vec![0u8; len];
                        self.disk.read_exact_at(&mut buf, off)?;
                        writer.write_all(&buf).map_err(std::io::Error::other)?;
                        self.bytes += len as u64;
                        (S_OK, len)
                    }
                }
            }
            T_OUT => {
                let len = reader.available_bytes().min(MAX_REQUEST);
                match offset.filter(|o| o + len as u64 <= self.capacity) {
                    None => (S_IOERR, 0),
                    Some(off) => {
                        let mut buf = vec![0u8; len];
                        reader.read_exact(&mut buf).map_err(std::io::Error::other)?;
                        self.disk.write_all_at(&buf, off)?;
                        if let Some(w) = &mut self.written {
                            w.push((off, len as u64));
                        }
                        self.bytes += len as u64;
                        (S_OK, 0)
                    }
                }
            }
            T_FLUSH => {
                self.disk.sync_data()?;
                (S_OK, 0)
            }
            T_GET_ID => {
                let mut id = [0u8; 20];
                id[..13].copy_from_slice(b"lockstep-disk");
                let n = data_room.min(20);
                writer.write_all(&id[..n]).map_err(std::io::Error::other)?;
                (S_OK, n)
            }
            _ => (S_UNSUPP, 0),
        };
        // The status byte is the last writable byte of the chain.
        if data_room > written {
            let pad = vec![0u8; data_room - written];
            writer.write_all(&pad).map_err(std::io::Error::other)?;
        }
        writer.write_all(&[status]).map_err(std::io::Error::other)?;
        self.requests += 1;
        Ok((status, (data_room + 1) as u32))
    }
}

impl VirtioDevice for Blk {
    const DEVICE_TYPE: u32 = 2;
    const IRQ: u8 = lockstep_guest_abi::irq::BLK;

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_FLUSH
    }

    fn queue_sizes(&self) -> &'static [u16] {
        &[64]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config space: capacity (u64, sectors) at 0, then zeros.
        let mut config = [0u8; 64];
        config[..8].copy_from_slice(&(self.capacity / SECTOR).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes()); // blk_size
        let start = (offset as usize).min(config.len());
        let end = (start + data.len()).min(config.len());
        data[..end - start].copy_from_slice(&config[start..end]);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], ctx: &mut DeviceCtx) -> Result<u32, DeviceError> {
        let mut used = 0;
        while let Some(chain) = queues[index].pop_descriptor_chain(ctx.mem) {
            let head = chain.head_index();
            let (_status, len) = self.serve(chain, ctx)?;
            queues[index].add_used(ctx.mem, head, len).map_err(|e| std::io::Error::other(e.to_string()))?;
            used = 1 << index;
        }
        Ok(used)
    }

    fn reset(&mut self) {}

    fn hash_into(&self, h: &mut blake3::Hasher) {
        h.update(&self.capacity.to_le_bytes());
        h.update(&self.requests.to_le_bytes());
        h.update(&self.bytes.to_le_bytes());
    }
}
