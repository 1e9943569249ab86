//! A filesystem that forgets what was not fsynced, in the style of LazyFS: a power cut
//! for tests.
//!
//! [`LazyFs::mount`] mounts an in-memory FUSE filesystem. Each file has its content as
//! the programs using it see it, and its *durable* content: what it held at its last
//! `fsync`/`fdatasync` (or a `sync_file_range`-free world's equivalent). [`LazyFs::power_cut`]
//! unmounts it (the kernel's page cache goes with the mount), sets every file back to
//! its durable content and mounts it again: whatever was written and not synced is gone,
//! as after a power loss on a disk whose write cache is lost.
//!
//! As in LazyFS, metadata operations (create, mkdir, rename, unlink, chmod) are durable
//! at once; only file data waits for a sync. The processes using the filesystem must be
//! dead before the cut (a power cut kills them too).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

const TTL: Duration = Duration::from_secs(1);
const BLOCK: u32 = 4096;

/// A file's bytes: what readers see, and what survives a power cut.
#[derive(Default)]
struct Content {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// The bytes of `data` that may differ from `durable` (outside it they are equal).
    dirty: Option<Range<usize>>,
}

impl Content {
    fn touch(&mut self, range: Range<usize>) {
        self.dirty = Some(match self.dirty.take() {
            Some(d) => d.start.min(range.start)..d.end.max(range.end),
            None => range,
        });
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        let end = offset + bytes.len();
        if self.data.len() < end {
            let old = self.data.len();
            self.data.resize(end, 0);
            self.touch(old..end);
        }
        self.data[offset..end].copy_from_slice(bytes);
        self.touch(offset..end);
    }

    fn set_len(&mut self, len: usize) {
        let old = self.data.len();
        self.data.resize(len, 0);
        self.touch(old.min(len)..old.max(len));
    }

    /// `fsync`: the durable content becomes the content. Returns the bytes synced.
    fn sync(&mut self) -> usize {
        let Some(dirty) = self.dirty.take() else {
            return 0;
        };
        self.durable.resize(self.data.len(), 0);
        let range = dirty.start.min(self.data.len())..dirty.end.min(self.data.len());
        self.durable[range.clone()].copy_from_slice(&self.data[range.clone()]);
        range.len()
    }

    /// The power cut: back to the durable content. Returns the bytes that differed.
    fn cut(&mut self) -> usize {
        let Some(dirty) = self.dirty.take() else {
            return 0;
        };
        let lost = dirty.len();
        self.data.clone_from(&self.durable);
        lost
    }
}

enum Kind {
    Dir(BTreeMap<OsString, u64>),
    File(Content),
    Symlink(PathBuf),
}

struct Node {
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: SystemTime,
    ctime: SystemTime,
}

impl Node {
    fn file_type(&self) -> FileType {
        match self.kind {
            Kind::Dir(_) => FileType::Directory,
            Kind::File(_) => FileType::RegularFile,
            Kind::Symlink(_) => FileType::Symlink,
        }
    }

    fn size(&self) -> u64 {
        match &self.kind {
            Kind::Dir(entries) => entries.len() as u64,
            Kind::File(content) => content.data.len() as u64,
            Kind::Symlink(target) => target.as_os_str().len() as u64,
        }
    }
}

/// What a power cut did, and what the filesystem saw before it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CutReport {
    /// Files whose unsynced bytes were dropped.
    pub files_reverted: u64,
    /// Their paths (from the mount's root) with the bytes each lost, largest first.
    pub reverted: Vec<(String, u64)>,
    /// Bytes dropped: per file, the span from its first unsynced byte to its last.
    pub bytes_lost: u64,
    /// fsync/fdatasync calls since the mount (or the last cut).
    pub syncs: u64,
    /// Bytes made durable by them.
    pub bytes_synced: u64,
}

struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    syncs: u64,
    bytes_synced: u64,
}

impl State {
    fn new() -> State {
        let mut nodes = HashMap::new();
        nodes.insert(
            INodeNo::ROOT.0,
            new_node(Kind::Dir(BTreeMap::new()), 0o755, 0, 0),
        );
        State {
            nodes,
            next_ino: INodeNo::ROOT.0 + 1,
            syncs: 0,
            bytes_synced: 0,
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let node = self.nodes.get(&ino)?;
        let size = node.size();
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.ctime,
            crtime: node.ctime,
            kind: node.file_type(),
            perm: node.perm,
            nlink: node.nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        })
    }

    fn entries(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.nodes.get_mut(&dir).map(|n| &mut n.kind) {
            Some(Kind::Dir(entries)) => Ok(entries),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn content(&mut self, ino: u64) -> Result<&mut Content, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::File(content)) => Ok(content),
            Some(Kind::Dir(_)) => Err(Errno::EISDIR),
            Some(Kind::Symlink(_)) => Err(Errno::EINVAL),
            None => Err(Errno::ENOENT),
        }
    }

    fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries(parent)?
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    /// A new node named `name` in `parent`; its attributes.
    fn add(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<FileAttr, Errno> {
        if self.entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        self.entries(parent)?.insert(name.to_owned(), ino);
        self.touch(parent);
        Ok(self.attr(ino).expect("just inserted"))
    }

    /// Removes `name` from `parent` (a directory only when `dir`, and only when empty).
    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        match (&self.nodes[&ino].kind, dir) {
            (Kind::Dir(entries), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
            (Kind::Dir(_), false) => return Err(Errno::EISDIR),
            (Kind::File(_) | Kind::Symlink(_), true) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        self.entries(parent)?.remove(name);
        self.unlinked(ino);
        self.touch(parent);
        Ok(())
    }

    /// One link fewer. The node stays while the processes that have it open may still
    /// read it; the power cut (which they do not outlive) drops those with no link.
    fn unlinked(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.nlink = node.nlink.saturating_sub(1);
            if matches!(node.kind, Kind::Dir(_)) {
                node.nlink = 0;
            }
        }
    }

    fn touch(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            let now = SystemTime::now();
            node.mtime = now;
            node.ctime = now;
        }
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        let moving_dir = matches!(self.nodes[&ino].kind, Kind::Dir(_));
        if let Ok(existing) = self.lookup(new_parent, new_name) {
            if existing == ino {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            match (&self.nodes[&existing].kind, moving_dir) {
                (Kind::Dir(entries), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
                (Kind::Dir(_), false) => return Err(Errno::EISDIR),
                (Kind::File(_) | Kind::Symlink(_), true) => return Err(Errno::ENOTDIR),
                _ => {}
            }
            self.unlinked(existing);
        }
        self.entries(parent)?.remove(name);
        self.entries(new_parent)?.insert(new_name.to_owned(), ino);
        self.touch(parent);
        self.touch(new_parent);
        Ok(())
    }

    fn cut(&mut self) -> CutReport {
        self.nodes.retain(|_, node| node.nlink > 0);
        let mut report = CutReport {
            syncs: std::mem::take(&mut self.syncs),
            bytes_synced: std::mem::take(&mut self.bytes_synced),
            ..CutReport::default()
        };
        let paths = self.paths();
        for (ino, node) in &mut self.nodes {
            if let Kind::File(content) = &mut node.kind {
                let lost = content.cut();
                if lost > 0 {
                    report.files_reverted += 1;
                    report.bytes_lost += lost as u64;
                    let path = paths
                        .get(ino)
                        .cloned()
                        .unwrap_or_else(|| format!("(inode {ino})"));
                    report.reverted.push((path, lost as u64));
                }
            }
        }
        report
            .reverted
            .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        report
    }

    /// Each linked node's path from the root.
    fn paths(&self) -> HashMap<u64, String> {
        let mut paths = HashMap::new();
        let mut todo = vec![(INodeNo::ROOT.0, String::new())];
        while let Some((dir, prefix)) = todo.pop() {
            if let Some(Kind::Dir(entries)) = self.nodes.get(&dir).map(|n| &n.kind) {
                for (name, &ino) in entries {
                    let path = format!("{prefix}/{}", name.to_string_lossy());
                    todo.push((ino, path.clone()));
                    paths.insert(ino, path);
                }
            }
        }
        paths
    }
}

fn new_node(kind: Kind, perm: u16, uid: u32, gid: u32) -> Node {
    let now = SystemTime::now();
    Node {
        nlink: if matches!(kind, Kind::Dir(_)) { 2 } else { 1 },
        kind,
        perm,
        uid,
        gid,
        mtime: now,
        ctime: now,
    }
}

/// The FUSE side: every request takes the state's lock.
struct Fs(Arc<Mutex<State>>);

impl Fs {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// mknod, mkdir, symlink: a new node of `kind` named `name` in `parent`.
    fn add_entry(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        kind: Kind,
        perm: u16,
        reply: ReplyEntry,
    ) {
        match self
            .state()
            .add(parent.0, name, new_node(kind, perm, req.uid(), req.gid()))
        {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }
}

/// Offsets and sizes from the kernel, as indexes into a file held in memory.
fn index(offset: u64, len: usize) -> Result<usize, Errno> {
    usize::try_from(offset)
        .ok()
        .filter(|o| o.checked_add(len).is_some_and(|end| end <= 1 << 34))
        .ok_or(Errno::EFBIG)
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut state = self.state();
        match state.lookup(parent.0, name) {
            Ok(ino) => reply.entry(&TTL, &state.attr(ino).expect("linked"), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.state();
        if let Some(size) = size {
            let len = match index(size, 0) {
                Ok(len) => len,
                Err(e) => return reply.error(e),
            };
            match state.content(ino.0) {
                Ok(content) => content.set_len(len),
                Err(e) => return reply.error(e),
            }
        }
        let Some(node) = state.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(mode) = mode {
            node.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = uid {
            node.uid = uid;
        }
        if let Some(gid) = gid {
            node.gid = gid;
        }
        node.ctime = SystemTime::now();
        node.mtime = match mtime {
            Some(TimeOrNow::SpecificTime(t)) => t,
            Some(TimeOrNow::Now) => SystemTime::now(),
            None if size.is_some() => SystemTime::now(),
            None => node.mtime,
        };
        reply.attr(&TTL, &state.attr(ino.0).expect("present"));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.state().nodes.get(&ino.0).map(|n| &n.kind) {
            Some(Kind::Symlink(target)) => reply.data(target.as_os_str().as_encoded_bytes()),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EOPNOTSUPP);
        }
        self.add_entry(
            req,
            parent,
            name,
            Kind::File(Content::default()),
            perm(mode, umask),
            reply,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.add_entry(
            req,
            parent,
            name,
            Kind::Dir(BTreeMap::new()),
            perm(mode, umask),
            reply,
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.add_entry(
            req,
            parent,
            link_name,
            Kind::Symlink(target.to_owned()),
            0o777,
            reply,
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self
            .state()
            .rename(parent.0, name, newparent.0, newname, flags)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state().nodes.get(&ino.0) {
            Some(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut state = self.state();
        let content = match state.content(ino.0) {
            Ok(content) => content,
            Err(e) => return reply.error(e),
        };
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(content.data.len());
        let end = start.saturating_add(size as usize).min(content.data.len());
        reply.data(&content.data[start..end]);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = self.state();
        let at = match index(offset, data.len()) {
            Ok(at) => at,
            Err(e) => return reply.error(e),
        };
        match state.content(ino.0) {
            Ok(content) => content.write(at, data),
            Err(e) => return reply.error(e),
        }
        state.touch(ino.0);
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        let synced = match state.content(ino.0) {
            Ok(content) => content.sync(),
            Err(Errno::EISDIR) => 0,
            Err(e) => return reply.error(e),
        };
        state.syncs += 1;
        state.bytes_synced += synced as u64;
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state().entries(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut state = self.state();
        let entries: Vec<(u64, OsString)> = match state.entries(ino.0) {
            Ok(entries) => entries
                .iter()
                .map(|(name, ino)| (*ino, name.clone()))
                .collect(),
            Err(e) => return reply.error(e),
        };
        let listed = [(ino.0, OsString::from(".")), (ino.0, OsString::from(".."))]
            .into_iter()
            .chain(entries);
        for (i, (child, name)) in listed
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
            let kind = state
                .nodes
                .get(&child)
                .map_or(FileType::RegularFile, Node::file_type);
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Metadata is durable at once.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // 64 GiB, nearly all free: the programs above must not think the disk is full.
        let blocks = (64u64 << 30) / u64::from(BLOCK);
        reply.statfs(
            blocks,
            blocks - 1,
            blocks - 1,
            1 << 20,
            1 << 20,
            BLOCK,
            255,
            BLOCK,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        match self.state().nodes.get(&ino.0) {
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let node = new_node(
            Kind::File(Content::default()),
            perm(mode, umask),
            req.uid(),
            req.gid(),
        );
        match self.state().add(parent.0, name, node) {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // Only the plain form: make room up to offset + length.
        if mode != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let mut state = self.state();
        let end = match offset
            .checked_add(length)
            .ok_or(Errno::EFBIG)
            .and_then(|end| index(end, 0))
        {
            Ok(end) => end,
            Err(e) => return reply.error(e),
        };
        match state.content(ino.0) {
            Ok(content) if content.data.len() < end => content.set_len(end),
            Ok(_) => {}
            Err(e) => return reply.error(e),
        }
        reply.ok();
    }
}

fn perm(mode: u32, umask: u32) -> u16 {
    (mode & !umask & 0o7777) as u16
}

/// A mounted [`LazyFs`]: unmounted on drop.
pub struct LazyFs {
    state: Arc<Mutex<State>>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl LazyFs {
    /// Mounts an empty filesystem on `mountpoint` (an existing directory). Needs root
    /// (or `fusermount3`) and `/dev/fuse`.
    pub fn mount(mountpoint: &Path) -> std::io::Result<LazyFs> {
        let mut fs = LazyFs {
            state: Arc::new(Mutex::new(State::new())),
            mountpoint: mountpoint.to_owned(),
            session: None,
        };
        fs.session = Some(fs.spawn()?);
        Ok(fs)
    }

    fn spawn(&self) -> std::io::Result<BackgroundSession> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("athanor-lazyfs".into()),
            MountOption::DefaultPermissions,
        ];
        fuser::spawn_mount(Fs(self.state.clone()), &self.mountpoint, &config)
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The power cut: unmounts (the processes using it must be dead), drops every byte
    /// not synced, and mounts the filesystem again as the machine would find it.
    pub fn power_cut(&mut self) -> std::io::Result<CutReport> {
        if let Some(session) = self.session.take() {
            unmount(session, &self.mountpoint)?;
        }
        let report = self.state.lock().unwrap_or_else(|p| p.into_inner()).cut();
        self.session = Some(
            self.spawn()
                .map_err(|e| std::io::Error::other(format!("cannot mount again: {e}")))?,
        );
        Ok(report)
    }
}

/// Unmounts and waits for the session's thread, whose loop ends with "connection
/// aborted" when the kernel closes the FUSE channel: the normal end. A mount still busy
/// (a file of a process that is exiting) is tried again for up to 10 s; then the error
/// names the processes that hold files in it.
fn unmount(session: BackgroundSession, mountpoint: &Path) -> std::io::Result<()> {
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: a NUL-terminated path; umount2 reads it only.
        if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
            break;
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EBUSY) {
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let listed = mounts
                .lines()
                .filter(|l| l.contains("lazyfs"))
                .collect::<Vec<_>>()
                .join(" / ");
            return Err(std::io::Error::other(format!(
                "cannot unmount {}: {error}; mounts: {listed}; held by: {}",
                mountpoint.display(),
                holders(mountpoint)
            )));
        }
        if std::time::Instant::now() > deadline {
            return Err(std::io::Error::other(format!(
                "{} is still busy: {}",
                mountpoint.display(),
                holders(mountpoint)
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Unmounted: the session's loop ends on its next read of the channel, with ENODEV,
    // ECONNABORTED or EINVAL depending on where it was; none of them is a failure.
    match session.umount_and_join() {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ECONNABORTED | libc::EINVAL | libc::ENODEV)
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The processes with a file open under `mountpoint` ("pid (name)", or "none found").
fn holders(mountpoint: &Path) -> String {
    let mut found = Vec::new();
    for process in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = process.file_name();
        let fds = std::fs::read_dir(process.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten();
        if fds
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|target| target.starts_with(mountpoint))
        {
            let name = std::fs::read_to_string(process.path().join("comm")).unwrap_or_default();
            found.push(format!("{} ({})", pid.to_string_lossy(), name.trim()));
        }
    }
    if found.is_empty() {
        "none found".into()
    } else {
        found.join(", ")
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = unmount(session, &self.mountpoint);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    /// Written and synced survives the cut; written after the last sync does not;
    /// metadata (a rename, a new empty file) survives.
    #[test]
    fn a_power_cut_keeps_exactly_what_was_synced() {
        let dir = tempfile::tempdir().unwrap();
        let mut fs = LazyFs::mount(dir.path()).unwrap();
        let path = dir.path().join("log");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(b"synced ").unwrap();
        file.sync_all().unwrap();
        file.write_all(b"lost").unwrap();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.write_all(b"S").unwrap();
        drop(file);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/tmp"), b"never synced").unwrap();
        std::fs::rename(dir.path().join("sub/tmp"), dir.path().join("sub/meta")).unwrap();
        let mut read = String::new();
        std::fs::File::open(&path)
            .unwrap()
            .read_to_string(&mut read)
            .unwrap();
        assert_eq!(read, "Synced lost");

        let report = fs.power_cut().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"synced ");
        assert_eq!(std::fs::read(dir.path().join("sub/meta")).unwrap(), b"");
        assert!(!dir.path().join("sub/tmp").exists());
        assert_eq!(report.files_reverted, 2);
        assert_eq!(
            report.reverted,
            vec![("/sub/meta".to_string(), 12), ("/log".to_string(), 11)]
        );
        // "S" at 0 and "lost" at 7..11: the span 0..11; and the 12 bytes never synced.
        assert_eq!(report.bytes_lost, (11 + "never synced".len()) as u64);
        assert_eq!(report.syncs, 1);
        assert_eq!(report.bytes_synced, "synced ".len() as u64);

        // A truncation not synced is undone too; one synced stays.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(3).unwrap();
        drop(file);
        fs.power_cut().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"synced ");
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(3).unwrap();
        file.sync_data().unwrap();
        drop(file);
        fs.power_cut().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"syn");
        drop(fs);
    }
}
