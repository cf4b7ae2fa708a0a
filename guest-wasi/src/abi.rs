//! WASI preview1 (`wasi_snapshot_preview1`) numbers and record layouts, as the specification
//! (`legacy/preview1/docs.md` in the WASI repository) gives them. Only what this crate uses.

/// The import module every WASI preview1 function lives in.
pub const MODULE: &str = "wasi_snapshot_preview1";

/// A WASI error number (`errno`). `Errno::SUCCESS` is the only non-error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub u16);

impl Errno {
    pub const SUCCESS: Errno = Errno(0);
    pub const AGAIN: Errno = Errno(6);
    pub const BADF: Errno = Errno(8);
    pub const FAULT: Errno = Errno(21);
    pub const INVAL: Errno = Errno(28);
    pub const IO: Errno = Errno(29);
    pub const ISDIR: Errno = Errno(31);
    pub const MFILE: Errno = Errno(33);
    pub const NOSYS: Errno = Errno(52);
    pub const NOTCONN: Errno = Errno(53);
    pub const NOTDIR: Errno = Errno(54);
    pub const NOTSOCK: Errno = Errno(57);
    pub const NOTSUP: Errno = Errno(58);
    pub const OVERFLOW: Errno = Errno(61);
    pub const PIPE: Errno = Errno(64);
    pub const SPIPE: Errno = Errno(70);
}

/// `filetype`
pub mod filetype {
    pub const CHARACTER_DEVICE: u8 = 2;
    pub const SOCKET_STREAM: u8 = 6;
}

/// `fdflags`
pub mod fdflags {
    pub const APPEND: u16 = 1 << 0;
    pub const NONBLOCK: u16 = 1 << 2;
}

/// `clockid`
pub mod clock {
    pub const REALTIME: u32 = 0;
    pub const MONOTONIC: u32 = 1;
    pub const PROCESS_CPUTIME: u32 = 2;
    pub const THREAD_CPUTIME: u32 = 3;
}

/// `eventtype`
pub mod eventtype {
    pub const CLOCK: u8 = 0;
    pub const FD_READ: u8 = 1;
    pub const FD_WRITE: u8 = 2;
}

/// `subclockflags`: the timeout is an absolute time of the clock, not a duration.
pub const SUBSCRIPTION_CLOCK_ABSTIME: u16 = 1;
/// `eventrwflags`: the peer closed its end.
pub const EVENT_FD_READWRITE_HANGUP: u16 = 1;

/// `sdflags`
pub mod sdflags {
    pub const RD: u32 = 1;
    pub const WR: u32 = 2;
}

/// `rights`: what an fd may be used for. Nothing here enforces them (every descriptor is
/// reported with the rights its kind supports); they are reported because programs read them.
pub mod rights {
    pub const FD_READ: u64 = 1 << 1;
    pub const FD_FDSTAT_SET_FLAGS: u64 = 1 << 3;
    pub const FD_WRITE: u64 = 1 << 6;
    pub const FD_FILESTAT_GET: u64 = 1 << 21;
    pub const POLL_FD_READWRITE: u64 = 1 << 27;
    pub const SOCK_SHUTDOWN: u64 = 1 << 28;
    pub const SOCK_ACCEPT: u64 = 1 << 29;
}

/// Sizes of the records programs hand us pointers to.
pub mod size {
    /// `iovec` / `ciovec`: buf (u32), buf_len (u32).
    pub const IOVEC: u32 = 8;
    /// `fdstat`: filetype (u8) @0, flags (u16) @2, rights_base (u64) @8, rights_inheriting @16.
    pub const FDSTAT: u32 = 24;
    /// `filestat`: dev @0, ino @8, filetype (u8) @16, nlink @24, size @32, atim @40, mtim @48,
    /// ctim @56.
    pub const FILESTAT: u32 = 64;
    /// `subscription`: userdata @0, tag (u8) @8, then clock {id (u32) @16, timeout @24,
    /// precision @32, flags (u16) @40} or fd_readwrite {fd (u32) @16}.
    pub const SUBSCRIPTION: u32 = 48;
    /// `event`: userdata @0, error (u16) @8, type (u8) @10, fd_readwrite {nbytes @16,
    /// flags (u16) @24}.
    pub const EVENT: u32 = 32;
}

/// Every function of WASI preview1 with its WebAssembly signature, parameters then results
/// (`I` = i32, `L` = i64). The linker defines all of them, so any WASI program links; the
/// module check reports an import whose signature differs from this table by name.
pub const FUNCTIONS: &[(&str, &str, &str)] = &[
    ("args_get", "II", "I"),
    ("args_sizes_get", "II", "I"),
    ("environ_get", "II", "I"),
    ("environ_sizes_get", "II", "I"),
    ("clock_res_get", "II", "I"),
    ("clock_time_get", "ILI", "I"),
    ("fd_advise", "ILLI", "I"),
    ("fd_allocate", "ILL", "I"),
    ("fd_close", "I", "I"),
    ("fd_datasync", "I", "I"),
    ("fd_fdstat_get", "II", "I"),
    ("fd_fdstat_set_flags", "II", "I"),
    ("fd_fdstat_set_rights", "ILL", "I"),
    ("fd_filestat_get", "II", "I"),
    ("fd_filestat_set_size", "IL", "I"),
    ("fd_filestat_set_times", "ILLI", "I"),
    ("fd_pread", "IIILI", "I"),
    ("fd_prestat_get", "II", "I"),
    ("fd_prestat_dir_name", "III", "I"),
    ("fd_pwrite", "IIILI", "I"),
    ("fd_read", "IIII", "I"),
    ("fd_readdir", "IIILI", "I"),
    ("fd_renumber", "II", "I"),
    ("fd_seek", "ILII", "I"),
    ("fd_sync", "I", "I"),
    ("fd_tell", "II", "I"),
    ("fd_write", "IIII", "I"),
    ("path_create_directory", "III", "I"),
    ("path_filestat_get", "IIIII", "I"),
    ("path_filestat_set_times", "IIIILLI", "I"),
    ("path_link", "IIIIIII", "I"),
    ("path_open", "IIIIILLII", "I"),
    ("path_readlink", "IIIIII", "I"),
    ("path_remove_directory", "III", "I"),
    ("path_rename", "IIIIII", "I"),
    ("path_symlink", "IIIII", "I"),
    ("path_unlink_file", "III", "I"),
    ("poll_oneoff", "IIII", "I"),
    ("proc_exit", "I", ""),
    ("proc_raise", "I", "I"),
    ("sched_yield", "", "I"),
    ("random_get", "II", "I"),
    ("sock_accept", "III", "I"),
    ("sock_recv", "IIIIII", "I"),
    ("sock_send", "IIIII", "I"),
    ("sock_shutdown", "II", "I"),
];
