"""The sandboxed side of :mod:`megrez.eval.sandbox`: run as a script by path in a fresh Python
(``python -I -B sandbox_child.py``), reads a JSON spec on stdin, confines itself, then runs
the code. It imports nothing from megrez, so the confined process holds no project state.

Confinement, in order: resource limits (address space, CPU seconds, file size, no core
files); a private network namespace with no interfaces (as root, else inside a new user
namespace); the working directory; every capability dropped (as root: the uid stays 0, so an
interpreter installed under /root still imports, but root's powers are gone, also across
exec); Landlock, which denies every file-system write outside the working directory (and
``/dev/null``), every TCP bind/connect, and signals or ptrace to processes outside the
sandbox; finally no new processes: a seccomp filter makes fork/clone fail (RLIMIT_NPROC is not
enforced for uid 0, capabilities or not).
Exit status: 0 the code ran to the end, 1 it raised, 3 confinement could not be set up.
"""
import ctypes
import json
import os
import resource
import sys
import traceback

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446  # same on x86-64 and arm64
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_NO_NEW_PRIVS = 38
RULE_PATH_BENEATH = 1
FS_WRITE_FILE, FS_TRUNCATE = 1 << 1, 1 << 14
# remove dir/file, make char/dir/reg/sock/fifo/block/sym
FS_WRITE_DIR = sum(1 << b for b in (4, 5, 6, 7, 8, 9, 10, 11, 12))
FS_REFER = 1 << 13
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1 << 0, 1 << 1
PR_CAPBSET_DROP = 24
CAP_VERSION_3 = 0x20080522

PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, EAGAIN = 0x7FFF0000, 0x00050000, 11
# (audit arch, syscalls that create a process or thread)
PROCESS_SYSCALLS = {"x86_64": (0xC000003E, (56, 57, 58, 435)),      # clone, fork, vfork, clone3
                    "aarch64": (0xC00000B7, (220, 435))}             # clone, clone3

libc = ctypes.CDLL(None, use_errno=True)


def fail(message):
    sys.stderr.write(f"sandbox: {message}\n")
    sys.stderr.flush()
    os._exit(3)


def landlock_abi():
    libc.syscall.restype = ctypes.c_long
    v = libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return v if v > 0 else 0


class PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock(workdir, abi):
    fs = FS_WRITE_FILE | FS_WRITE_DIR | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL if abi >= 6 else 0
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        fail(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    file_rights = FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0)
    for path, rights in ((workdir, fs), ("/dev/null", file_rights)):
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneath(rights, pfd)
        if libc.syscall(SYS_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(rule),
                        ctypes.c_uint32(0)) != 0:
            fail(f"landlock_add_rule({path}): {os.strerror(ctypes.get_errno())}")
        os.close(pfd)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        fail("prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.syscall(SYS_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
        fail(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    os.close(fd)
    return "tcp" if net else ""


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def forbid_new_processes():
    """A seccomp filter: fork/vfork/clone/clone3 fail with EAGAIN, as at a process limit; any
    other architecture's system calls fail too, so the filter cannot be sidestepped."""
    import platform

    machine = platform.machine()
    if machine not in PROCESS_SYSCALLS:
        fail(f"no seccomp filter for this architecture ({machine}) to stop new processes")
    arch, blocked = PROCESS_SYSCALLS[machine]
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    deny = SECCOMP_RET_ERRNO | EAGAIN
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, deny), (ld, 0, 0, 0)]
    if machine == "x86_64":  # the x32 ABI numbers its calls from 1 << 30
        prog += [(0x35, 0, 1, 0x40000000), (ret, 0, 0, deny)]   # BPF_JMP|JGE|K
    for nr in blocked:
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, deny)]
    prog.append((ret, 0, 0, SECCOMP_RET_ALLOW))
    filters = (SockFilter * len(prog))(*[SockFilter(*f) for f in prog])
    fprog = SockFprog(len(prog), filters)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        fail(f"seccomp: {os.strerror(ctypes.get_errno())}")


def drop_capabilities():
    """Empty the bounding set (so exec cannot give them back), then every capability set."""
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:  # EINVAL: past the last
            break
    header = (ctypes.c_uint32 * 2)(CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.capset(ctypes.byref(header), ctypes.byref(data)) != 0:
        fail(f"capset: {os.strerror(ctypes.get_errno())}")


def isolate_network():
    if libc.unshare(CLONE_NEWNET) == 0:
        return "netns"
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        try:  # map ourselves, so files we create keep our ids
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"{uid} {uid} 1")
            with open("/proc/self/gid_map", "w") as f:
                f.write(f"{gid} {gid} 1")
        except OSError:
            pass
        return "userns+netns"
    return ""


def main():
    spec = json.loads(sys.stdin.read())
    workdir = spec["dir"]
    limit = spec["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cpu = int(spec["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["file_bytes"], spec["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    network = isolate_network()
    abi = landlock_abi()
    if not network and not (abi >= 4) and spec["require_isolation"]:
        fail("cannot isolate the network here (no network namespace, no user namespace, no Landlock ABI >= 4)")
    if not abi and spec["require_isolation"]:
        fail("Landlock is not available (Linux >= 5.13 with Landlock enabled), so writes outside the "
             "sandbox directory cannot be blocked")
    os.chdir(workdir)
    drop_capabilities()
    tcp = landlock(workdir, abi) if abi else ""
    if not spec["allow_processes"]:
        forbid_new_processes()
    sys.stderr.write(json.dumps({"isolation": {"network": "+".join(x for x in (network, tcp) if x),
                                               "landlock_abi": abi, "uid": os.getuid()}}) + "\n")
    sys.stderr.flush()
    code = spec["code"]
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(code, os.path.join(workdir, "program.py"), "exec"), namespace)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        os._exit(1 if code else 0)
    except BaseException:
        lines = traceback.format_exc().strip().splitlines()
        sys.stderr.write("\n".join(lines[-3:])[-2000:] + "\n")
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
