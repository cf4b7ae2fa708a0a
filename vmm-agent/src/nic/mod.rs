//! The host side of the VM's layer-2 network interface.
//!
//! A frame's path, guest to host and back:
//!
//! ```text
//!  guest virtio-net ⇄ VMM device ⇄ TAP (lstept0 / lstept1) ⇄ bridge (lstepbr, 10.123.0.1) ⇄ host
//! ```
//!
//! Each replica slot has its own [`Port`], a port of one Linux bridge ([`L2Network`]) that
//! carries the host's address. The VM's address (10.123.0.2 by default) and its MAC exist only
//! inside the guest: no host interface has them, so the host never answers ARP for the VM, and
//! whatever the network learns about the VM it learns from the guest's own frames — which both
//! replicas produce identically, since they run the same instructions.
//!
//! Only the primary's tap carries traffic. The backup has its tap open (so the port has
//! carrier and the bridge keeps it forwarding) but never reads or writes it: its guest's
//! network input comes from the primary's log, and its output must not reach the wire twice.
//! Broadcasts pile up in that tap's queue meanwhile (the kernel drops past its length).
//!
//! When the backup goes live it:
//! 1. drains its tap ([`Port::drain`]) — those frames were for the old primary, which took
//!    them in and logged them, or they are lost with it (the senders retransmit);
//! 2. sends a gratuitous ARP from the VM's MAC ([`gratuitous_arp`]), so the bridge moves the
//!    MAC to the new port now instead of sending the VM's frames to the dead port until its
//!    entry ages out, and neighbours refresh their ARP caches;
//! 3. re-sends the frames the replay produced last, which the old primary may or may not have
//!    put on the wire before it died. Duplicates are harmless: TCP discards segments it has
//!    already seen, and a lost one would only have cost a retransmission timeout.

mod arp;
mod l2;
mod packet;
mod tap;

pub use packet::{complete_checksum, segment_tcp};

pub use arp::{ARP_FRAME_LEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, gratuitous_arp};
pub use l2::{DEFAULT_PREFIX, L2Config, L2Error, L2Network, format_mac};
pub use tap::{MAX_FRAME_LEN, Port, check_ifname};
