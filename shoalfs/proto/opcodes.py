"""RPC opcodes. Values live in 1..999 so they never collide with result codes
(0 and 100000+, see errors.py)."""

from __future__ import annotations

from enum import IntEnum


class Op(IntEnum):
    # common
    PING = 1
    HEARTBEAT = 2
    CREATE_PARTITION = 3
    DELETE_PARTITION = 4
    SUBSCRIBE = 5  # client -> metanode: push me lifecycle events of a volume
    EVENT_VOLUME_DELETED = 6  # metanode -> client push, body {tombstone}
    AUTH = 7  # present a capability: it applies to every later request on the connection
    PARTITION_VIEW = 8  # master -> node: the partition's view changed (replication/view.py)
    # metanode
    META_CREATE_INODE = 100
    META_GET_INODE = 101
    META_BATCH_GET_INODE = 102
    META_SET_ATTR = 103
    META_LINK_INODE = 104
    META_UNLINK_INODE = 105
    META_EVICT_INODE = 106
    META_CREATE_DENTRY = 107
    META_LOOKUP = 108
    META_DELETE_DENTRY = 109
    META_READDIR = 110
    META_RENAME = 111
    META_RENAME_LINK_TX = 112
    META_EXTENT_SET = 113
    META_EXTENT_LIST = 114
    META_SET_XATTR = 115
    META_GET_XATTR = 116
    META_LIST_XATTR = 117
    META_REMOVE_XATTR = 118
    META_EXTENT_DROP = 120
    META_CREATE = 121  # inode + dentry in the parent's partition, one record
    META_RMDIR_PREPARE = 122  # an empty directory refuses new entries while it is removed
    META_RMDIR_ABORT = 123
    META_SCAN = 124  # fsck: inodes and directory entries of a partition, page by page
    META_SET_NLINK = 125  # fsck: repair a link count
    META_CLOSE = 126  # a session's last handle on a file closed (an unlinked file may go now)
    META_RENEW_LEASES = 127  # the files a session has open in a partition: still open
    META_RECLAIM_ORPHAN = 128  # the orphan sweeper: reclaim an inode if it is as the sweep saw it
    META_RECORDS = 129  # journal records the leader made durable (forwarded to followers only)
    META_USAGE = 130  # fsck: a partition's inode and byte counts against a fresh count
    META_TAG_QUOTA = 131  # `shoal quota set`: count an inode toward a directory quota (or no longer)
    META_LOCK = 132  # set a file lock (or test for one), waiting a while if asked (proto/locks.py)
    META_LOCK_CANCEL = 133  # the process waiting for a lock was interrupted: answer its request now
    META_RELEASE_LOCKS = 134  # drop a session's locks (on a file, of an owner, or all)
    # datanode
    DATA_WRITE = 200
    DATA_READ = 201
    DATA_TRUNCATE = 202
    DATA_DELETE_EXTENT = 203
    DATA_SYNC = 204
    # replication between the members of a partition (shoalfs/replication)
    REPL_FORWARD = 300  # leader -> follower: apply this change (an op and its body) at this view
    REPL_PING = 301  # leader -> follower: the views it leads there; renews its read lease
    REPL_DIGEST = 302  # what a replica holds, in brief (data: extent sizes and checksums)
    REPL_EXTENT_READ = 303  # raw bytes of an extent or of its checksums
    REPL_EXTENT_INSTALL = 304  # a whole extent copied from another replica, piece by piece
    REPL_EXTENT_DROP = 305  # an extent the leader does not hold
    REPL_SNAPSHOT = 306  # a meta partition's whole state from its leader, piece by piece
    REPL_SCRUB = 307  # master -> leader: compare every in-sync copy with yours; repair what differs


# Metadata changes a client may retry after a failover: each carries a request id
# ("rid"), and the partition answers a repeat from the answer kept with the change
META_ONCE = frozenset({
    Op.META_CREATE_INODE, Op.META_CREATE, Op.META_SET_ATTR, Op.META_LINK_INODE, Op.META_UNLINK_INODE,
    Op.META_EVICT_INODE, Op.META_CREATE_DENTRY, Op.META_DELETE_DENTRY, Op.META_RENAME, Op.META_EXTENT_SET,
    Op.META_EXTENT_DROP, Op.META_SET_XATTR, Op.META_REMOVE_XATTR, Op.META_RMDIR_PREPARE, Op.META_RMDIR_ABORT,
    Op.META_CLOSE, Op.META_SET_NLINK, Op.META_TAG_QUOTA,
})
