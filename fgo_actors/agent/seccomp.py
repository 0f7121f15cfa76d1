"""The sandbox's system-call filter: what LLM-written code may not ask the kernel.

Namespaces (``sandbox.isolation``) already take the network, our processes
and our files out of the code's sight where they can be had. The filter is
the layer under them, and the only one left where they cannot (a container
whose own seccomp profile refuses ``unshare``): it refuses, with ``EPERM``,

- every new socket (``socket``; ``socketpair`` stays, it reaches nothing):
  no network, and no Unix socket of a daemon on the machine (docker.sock),
  with or without a network namespace;
- reading or writing other processes (``ptrace``, ``process_vm_*``,
  ``pidfd_getfd``, ``kcmp``) and the kernel's own interfaces that containers
  refuse too (``bpf``, ``perf_event_open``, ``userfaultfd``, ``keyctl``, module
  and ``kexec`` loading, ``io_uring``, which can open sockets by itself);
- undoing the jail (``mount`` and the new mount API, ``pivot_root``,
  ``chroot``, ``unshare``, ``setns``, ``open_by_handle_at``) and new
  namespaces through ``clone`` flags; ``clone3``, whose flags a filter cannot
  read, answers ``ENOSYS``, so the C library falls back to ``clone``.

libseccomp (through ``pyseccomp``) compiles the rules into a BPF program
once, here in our process, without loading it. The runner installs those
bytes with ``prctl`` (after ``no_new_privs``) as its last step before it
reads the request, so the filter holds for the code and everything it
starts, and the runner stays standard-library only. Where libseccomp is
missing, the sandbox runs without the filter and says so once
(``sandbox_no_seccomp``).
"""

from __future__ import annotations

import errno
import functools
import tempfile

import structlog

# Refused with EPERM whatever their arguments.
DENIED = (
    "socket",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "kcmp",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "mount",
    "umount2",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "name_to_handle_at",
    "open_by_handle_at",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "syslog",
    "settimeofday",
    "clock_settime",
    "adjtimex",
)
# clone(2) flags that make a new namespace: clone with any of them is refused.
CLONE_NEW_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}


def build() -> bytes:
    """The filter as a BPF program (``struct sock_filter`` records, native
    byte order) for this machine's architecture. Raises where libseccomp
    cannot be loaded."""
    import pyseccomp as sc  # ctypes over libseccomp.so: raises without it

    f = sc.SyscallFilter(sc.ALLOW)
    for name in DENIED:
        f.add_rule(sc.ERRNO(errno.EPERM), name)
    for flag in CLONE_NEW_FLAGS.values():
        f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


@functools.cache
def program() -> str | None:
    """The filter's BPF program as hex for the runner, or None (logged once)
    where it cannot be built here."""
    try:
        return build().hex()
    except Exception as e:  # ImportError, RuntimeError (no libseccomp), OSError
        structlog.get_logger().warning("sandbox_no_seccomp", reason=f"{type(e).__name__}: {e}")
        return None
