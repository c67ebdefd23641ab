/*
 * sandlock native helpers, compiled by cffi in out-of-line API mode (see _ffi_build.py).
 *
 * Two jobs:
 *  1. thin wrappers for the syscalls Python lacks (Landlock, seccomp, pidfd, notification ioctls), each
 *     returning the result or -errno so Python never races on errno;
 *  2. the child half of a spawn: everything between fork() and execve() runs here in C, so the child never
 *     runs Python after fork (no lock held by another parent thread can deadlock it).
 *
 * Everything the child calls after fork is async-signal-safe: raw syscalls, no malloc, no stdio.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#include "native.h"

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef PR_SET_THP_DISABLE
#define PR_SET_THP_DISABLE 41
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

#define RET(expr) do { long _r = (long)(expr); return _r < 0 ? -errno : _r; } while (0)

/* ---- plain syscall wrappers: result, or -errno ---- */

long sl_landlock_create_ruleset(const struct sl_ruleset_attr *attr, size_t size, uint32_t flags)
{ RET(syscall(SYS_landlock_create_ruleset, attr, size, flags)); }

long sl_landlock_add_path_rule(int ruleset_fd, uint64_t allowed, int parent_fd)
{
    struct __attribute__((packed)) { uint64_t allowed_access; int32_t parent_fd; } a = { allowed, parent_fd };
    RET(syscall(SYS_landlock_add_rule, ruleset_fd, 1 /* LANDLOCK_RULE_PATH_BENEATH */, &a, 0));
}

long sl_landlock_add_net_rule(int ruleset_fd, uint64_t allowed, uint64_t port)
{
    struct { uint64_t allowed_access; uint64_t port; } a = { allowed, port };
    RET(syscall(SYS_landlock_add_rule, ruleset_fd, 2 /* LANDLOCK_RULE_NET_PORT */, &a, 0));
}

long sl_landlock_restrict_self(int ruleset_fd, uint32_t flags)
{ RET(syscall(SYS_landlock_restrict_self, ruleset_fd, flags)); }

long sl_seccomp(unsigned int op, unsigned int flags, void *args)
{ RET(syscall(SYS_seccomp, op, flags, args)); }

long sl_seccomp_set_filter(const void *insns, unsigned short count, unsigned int flags)
{
    struct sock_fprog prog = { count, (struct sock_filter *)insns };
    RET(syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog));
}

long sl_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)
{ RET(prctl(option, a2, a3, a4, a5)); }

long sl_pidfd_open(int pid, unsigned int flags) { RET(syscall(SYS_pidfd_open, pid, flags)); }
long sl_pidfd_getfd(int pidfd, int fd, unsigned int flags) { RET(syscall(SYS_pidfd_getfd, pidfd, fd, flags)); }
long sl_pidfd_send_signal(int pidfd, int sig) { RET(syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0)); }
long sl_close_range(unsigned int first, unsigned int last, unsigned int flags)
{ RET(syscall(SYS_close_range, first, last, flags)); }

long sl_process_vm_readv(int pid, void *local, size_t len, uint64_t remote)
{
    struct iovec l = { local, len }, r = { (void *)(uintptr_t)remote, len };
    RET(process_vm_readv(pid, &l, 1, &r, 1, 0));
}

long sl_process_vm_writev(int pid, const void *local, size_t len, uint64_t remote)
{
    struct iovec l = { (void *)local, len }, r = { (void *)(uintptr_t)remote, len };
    RET(process_vm_writev(pid, &l, 1, &r, 1, 0));
}

long sl_socketpair(int sv[2])
{ RET(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv)); }

long sl_raw_syscall6(long nr, long a, long b, long c, long d, long e, long f)
{ RET(syscall(nr, a, b, c, d, e, f)); }

/* ---- seccomp user notification: the supervisor's hot path ---- */

long sl_notif_sizes(uint16_t out[3])
{
    struct seccomp_notif_sizes s;
    long r = syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &s);
    if (r < 0) return -errno;
    out[0] = s.seccomp_notif; out[1] = s.seccomp_notif_resp; out[2] = s.seccomp_data;
    return 0;
}

/*
 * Wait for the next notification on `listener` (or for `wake_fd` to become readable, or the timeout) and
 * receive it. One call = one GIL release. Returns 1 with *n filled, 0 on timeout or a stale notification
 * (ENOENT: its task died), 2 when wake_fd fired, 3 when the listener hung up (no task left), or -errno.
 */
long sl_notif_wait_recv(int listener, int wake_fd, int timeout_ms, struct seccomp_notif *n)
{
    struct pollfd p[2] = { { listener, POLLIN, 0 }, { wake_fd, POLLIN, 0 } };
    int np = wake_fd >= 0 ? 2 : 1;
    int r;
    do { r = poll(p, np, timeout_ms); } while (r < 0 && errno == EINTR);
    if (r < 0) return -errno;
    if (r == 0) return 0;
    if (np == 2 && (p[1].revents & POLLIN)) return 2;
    if (p[0].revents & POLLIN) {
        memset(n, 0, sizeof(*n));
        if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, n) == 0) return 1;
        if (errno == ENOENT || errno == EINTR) return 0;
        return -errno;
    }
    if (p[0].revents & (POLLHUP | POLLERR | POLLNVAL)) return 3;
    return 0;
}

long sl_notif_send(int listener, uint64_t id, int64_t val, int32_t error, uint32_t flags)
{
    struct seccomp_notif_resp resp = { .id = id, .val = val, .error = error, .flags = flags };
    if (ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &resp) == 0) return 0;
    return -errno;
}

long sl_notif_continue(int listener, uint64_t id)
{ return sl_notif_send(listener, id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE); }

long sl_notif_id_valid(int listener, uint64_t id)
{
    if (ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) == 0) return 0;
    return -errno;
}

long sl_notif_addfd(int listener, uint64_t id, int srcfd, int newfd, uint32_t newfd_flags, uint32_t flags)
{
    struct seccomp_notif_addfd a = { .id = id, .flags = flags, .srcfd = (uint32_t)srcfd,
                                     .newfd = (uint32_t)newfd, .newfd_flags = newfd_flags };
    RET(ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, &a));
}

long sl_notif_set_flags(int listener, uint64_t flags)
{ RET(ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, flags)); }

/* ---- listener hand-off ---- */

static long send_msg_fd(int sock, const void *data, size_t len, int fd)
{
    struct iovec iov = { (void *)data, len };
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } u;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof(u.buf) };
    memset(u.buf, 0, sizeof(u.buf));
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET; c->cmsg_type = SCM_RIGHTS; c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    long r;
    do { r = sendmsg(sock, &msg, MSG_NOSIGNAL); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

long sl_send_fd(int sock, int fd)
{
    char byte = 'L';
    return send_msg_fd(sock, &byte, 1, fd);
}

/* Receive one message of up to `cap` bytes and at most one passed fd (*fd_out = -1 if none). */
long sl_recv_msg_fd(int sock, void *buf, size_t cap, int *fd_out)
{
    struct iovec iov = { buf, cap };
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } u;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof(u.buf) };
    long r;
    *fd_out = -1;
    do { r = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); } while (r < 0 && errno == EINTR);
    if (r < 0) return -errno;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            memcpy(fd_out, CMSG_DATA(c), sizeof(int));
    return r;
}

/* ---- the confinement sequence (child side) ---- */

/* A message on the hand-off socket: kind 'L' listener (fd attached or number in val), 'E' failure
   (step, errno), 'R' ready without listener. Fixed size so one read gets one message. */
struct sl_msg { char kind; uint8_t step; uint16_t pad; int32_t val; int32_t pid; };

static void write_all(int fd, const char *s, size_t n)
{
    while (n) {
        ssize_t w = write(fd, s, n);
        if (w < 0) { if (errno == EINTR) continue; return; }
        s += w; n -= (size_t)w;
    }
}

static const char *const step_names[] = {
    [SL_STEP_SETPGID] = "setpgid",           [SL_STEP_PDEATHSIG] = "prctl(PR_SET_PDEATHSIG)",
    [SL_STEP_PARENT_GONE] = "parent exited", [SL_STEP_SIGNALS] = "sigaction",
    [SL_STEP_STDIO] = "dup2(stdio)",         [SL_STEP_PERSONALITY] = "personality",
    [SL_STEP_AFFINITY] = "sched_setaffinity",[SL_STEP_THP] = "prctl(PR_SET_THP_DISABLE)",
    [SL_STEP_CORE] = "setrlimit(RLIMIT_CORE)",[SL_STEP_CHDIR] = "chdir",
    [SL_STEP_NNP] = "prctl(PR_SET_NO_NEW_PRIVS)", [SL_STEP_LANDLOCK] = "landlock_restrict_self",
    [SL_STEP_SECCOMP] = "seccomp", [SL_STEP_HANDOFF] = "listener hand-off",
    [SL_STEP_READY] = "wait for supervisor", [SL_STEP_CLOSE_FDS] = "close_range",
    [SL_STEP_NOFILE] = "setrlimit(RLIMIT_NOFILE)", [SL_STEP_EXEC] = "execve",
    [SL_STEP_FILTER2] = "seccomp (deny filter)", [SL_STEP_SPAWN] = "clone",
    [SL_STEP_NS_USERNS] = "namespaces: unshare(CLONE_NEWUSER|CLONE_NEWNS)",
    [SL_STEP_NS_IDMAP] = "namespaces: write uid_map/gid_map",
    [SL_STEP_NS_PRIVATE] = "namespaces: make mounts private",
    [SL_STEP_NS_OVERLAY] = "namespaces: mount overlay on the workdir",
    [SL_STEP_NS_CLONE] = "namespaces: open_tree (clone a writable tree)",
    [SL_STEP_NS_READONLY] = "namespaces: mount_setattr (read-only view)",
    [SL_STEP_NS_REATTACH] = "namespaces: move_mount (writable tree)",
    [SL_STEP_NS_CHROOT] = "namespaces: chroot",
    [SL_STEP_NS_CWD] = "namespaces: chdir (working directory in the new view)",
    [SL_STEP_NS_DUMPABLE] = "namespaces: prctl(PR_SET_DUMPABLE)",
    [SL_STEP_NS_LANDLOCK] = "namespaces: landlock_add_rule (overlay root)",
    [SL_STEP_NS_PIDNS] = "namespaces: clone(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID)",
    [SL_STEP_NS_PROC] = "namespaces: mount /proc of the new pid namespace",
    [SL_STEP_NS_HOSTPID] = "namespaces: read the program's pid in the caller's namespace",
};

const char *sl_step_name(int step)
{
    if (step < 0 || step >= (int)(sizeof(step_names) / sizeof(step_names[0])) || !step_names[step]) return "setup";
    return step_names[step];
}

/* This process's pid as the supervisor names it: under a pid namespace getpid() names another process of the
   caller's (pid 1 or 2 there), so the pid namespace code sets host_pid first. Never 1: the caller would signal
   its own init. */
static int32_t host_pid;

static int32_t self_pid(void) { return host_pid > 0 ? host_pid : host_pid < 0 ? 0 : (int32_t)getpid(); }

/* Report a failed step: on stderr as "sandlock: <step>: <error>" and to the parent over the socket. */
static void fail(const struct sl_cfg *cfg, int step, int err)
{
    const char *desc = strerrordesc_np(err);
    const char *name = sl_step_name(step);
    if (!desc) desc = "unknown error";
    if (!cfg->quiet_errors) {
        write_all(2, "sandlock: ", 10);
        write_all(2, name, strlen(name));
        write_all(2, ": ", 2);
        write_all(2, desc, strlen(desc));
        write_all(2, "\n", 1);
    }
    if (cfg->sock_fd >= 0) {
        struct sl_msg m = { 'E', (uint8_t)step, 0, err, self_pid() };
        write_all(cfg->sock_fd, (const char *)&m, sizeof(m));
    }
}

static int close_fds_except_from(unsigned int lo, const int *keep, int nkeep)
{
    /* keep[] is sorted ascending; close [lo, k0-1], [k0+1, k1-1], ..., [kn+1, ~0] */
    for (int i = 0; i < nkeep; i++) {
        unsigned int k = (unsigned int)keep[i];
        if (k < lo) continue;
        if (k > lo && syscall(SYS_close_range, lo, k - 1, 0) < 0) return -errno;
        lo = k + 1;
    }
    if (syscall(SYS_close_range, lo, ~0U, 0) < 0) return -errno;
    return 0;
}

static int close_fds_except(const int *keep, int nkeep) { return close_fds_except_from(3, keep, nkeep); }

/* ---- namespaces (namespaces.py, cow_overlay.py) ----
 *
 * Optional, before chdir/NO_NEW_PRIVS/Landlock/seccomp (Landlock and the blocklist forbid mounts later):
 * a user + mount namespace owned by the caller's uid, the caller mapped to itself (or to 0 with
 * ns_privileged), mounts made private, an overlay mounted on the workdir, everything but the writable trees
 * made read-only (the kernel then refuses chmod/chown/utimes/xattrs there: no supervisor needed for them),
 * then chroot. Each step fails closed with its own step code.
 */
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#define SL_OPEN_TREE_CLONE 1
#define SL_AT_RECURSIVE 0x8000
#define SL_MOVE_MOUNT_F_EMPTY_PATH 0x4
#define SL_MOUNT_ATTR_RDONLY 0x1
#define SL_NS_MAX_WRITABLE 64

struct sl_mount_attr { uint64_t attr_set, attr_clr, propagation, userns_fd; };

static void put_uint(char *dst, unsigned v);

/* Write a whole short text to a file (a /proc control file: one write, or an error). */
static int write_text(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    size_t len = strlen(text);
    ssize_t w = write(fd, text, len);
    int err = w == (ssize_t)len ? 0 : (w < 0 ? -errno : -EIO);
    close(fd);
    return err;
}

static int write_proc_self(const char *name, const char *text)
{
    char path[64] = "/proc/self/";
    strcat(path, name);
    return write_text(path, text);
}

/* "inside outside 1\n" */
static void id_map_line(char *dst, unsigned inside, unsigned outside)
{
    put_uint(dst, inside);
    strcat(dst, " ");
    put_uint(dst + strlen(dst), outside);
    strcat(dst, " 1\n");
}

static int ns_enter_userns(const struct sl_cfg *cfg)
{
    unsigned uid = (unsigned)geteuid(), gid = (unsigned)getegid();
    char line[64];
    int r;
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS) < 0) { fail(cfg, SL_STEP_NS_USERNS, errno); return -1; }
    id_map_line(line, cfg->ns_privileged ? 0 : uid, uid);
    if ((r = write_proc_self("uid_map", line)) < 0) { fail(cfg, SL_STEP_NS_IDMAP, -r); return -1; }
    if ((r = write_proc_self("setgroups", "deny")) < 0 && r != -ENOENT) { fail(cfg, SL_STEP_NS_IDMAP, -r); return -1; }
    id_map_line(line, cfg->ns_privileged ? 0 : gid, gid);
    if ((r = write_proc_self("gid_map", line)) < 0) { fail(cfg, SL_STEP_NS_IDMAP, -r); return -1; }
    return 0;
}

/* Make every mount read-only except the writable trees: clone those (rw) first, then put the clones back. */
static int ns_readonly_view(const struct sl_cfg *cfg)
{
    int fds[SL_NS_MAX_WRITABLE + 1];
    const char *paths[SL_NS_MAX_WRITABLE + 1];
    int n = 0;
    if (cfg->ov_target) paths[n++] = cfg->ov_target;
    for (int i = 0; i < cfg->n_ns_writable && n <= SL_NS_MAX_WRITABLE; i++) paths[n++] = cfg->ns_writable[i];
    for (int i = 0; i < n; i++) {
        fds[i] = (int)syscall(SYS_open_tree, AT_FDCWD, paths[i], SL_OPEN_TREE_CLONE | O_CLOEXEC | SL_AT_RECURSIVE);
        if (fds[i] < 0) { fail(cfg, SL_STEP_NS_CLONE, errno); return -1; }
    }
    struct sl_mount_attr ro = { SL_MOUNT_ATTR_RDONLY, 0, 0, 0 };
    if (syscall(SYS_mount_setattr, AT_FDCWD, "/", SL_AT_RECURSIVE, &ro, sizeof(ro)) < 0) {
        fail(cfg, SL_STEP_NS_READONLY, errno); return -1;
    }
    for (int i = 0; i < n; i++) {
        if (syscall(SYS_move_mount, fds[i], "", AT_FDCWD, paths[i], SL_MOVE_MOUNT_F_EMPTY_PATH) < 0) {
            fail(cfg, SL_STEP_NS_REATTACH, errno); return -1;
        }
        close(fds[i]);
    }
    return 0;
}

/* Landlock ignores the rules of a mount point (the workdir's own inode) when a walk climbs out of the
   overlay: the overlay's root, a new inode, gets the rule. landlock_fd is this run's own ruleset. */
static int ns_grant_overlay(const struct sl_cfg *cfg)
{
    int fd = open(cfg->ov_target, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) { fail(cfg, SL_STEP_NS_LANDLOCK, errno); return -1; }
    struct __attribute__((packed)) { uint64_t allowed_access; int32_t parent_fd; } a = { cfg->ov_landlock_rights, fd };
    long r = syscall(SYS_landlock_add_rule, cfg->landlock_fd, 1 /* LANDLOCK_RULE_PATH_BENEATH */, &a, 0);
    int err = errno;
    close(fd);
    if (r < 0) { fail(cfg, SL_STEP_NS_LANDLOCK, err); return -1; }
    return 0;
}

static int ns_setup(const struct sl_cfg *cfg)
{
    char cwd[4096];
    int have_cwd = !cfg->cwd && !cfg->ns_chroot && getcwd(cwd, sizeof(cwd)) != NULL;
    if (ns_enter_userns(cfg) < 0) return -1;
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) { fail(cfg, SL_STEP_NS_PRIVATE, errno); return -1; }
    if (cfg->ov_target && mount("overlay", cfg->ov_target, "overlay", 0, cfg->ov_options) < 0) {
        fail(cfg, SL_STEP_NS_OVERLAY, errno); return -1;
    }
    if (cfg->ov_target && cfg->ov_landlock_rights && cfg->landlock_fd >= 0 && ns_grant_overlay(cfg) < 0) return -1;
    if (cfg->ns_readonly && ns_readonly_view(cfg) < 0) return -1;
    if (cfg->ns_chroot) {
        if (chroot(cfg->ns_chroot) < 0) { fail(cfg, SL_STEP_NS_CHROOT, errno); return -1; }
        if (chdir("/") < 0) { fail(cfg, SL_STEP_NS_CWD, errno); return -1; }
    } else if (have_cwd && chdir(cwd) < 0) {  /* the inherited cwd still points below the new mounts */
        fail(cfg, SL_STEP_NS_CWD, errno); return -1;
    }
    /* Gaining capabilities in the new namespace made us non-dumpable: the supervisor (same uid, outside)
       needs pidfd_getfd and /proc/<pid>/mem on us, as on any sandbox. */
    if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) < 0) { fail(cfg, SL_STEP_NS_DUMPABLE, errno); return -1; }
    return 0;
}

/*
 * Confine the calling process as `cfg` says. On success returns 0 (the listener, if any, has been handed to
 * the parent and the parent said "ready"). On failure reports and returns -1: the caller must _exit(127).
 */
static int confine_process(const struct sl_cfg *cfg);
static int confine_rest(const struct sl_cfg *cfg);

int sl_confine(const struct sl_cfg *cfg)
{
    if (confine_process(cfg) < 0) return -1;
    if (cfg->ns_enable && ns_setup(cfg) < 0) return -1;
    return confine_rest(cfg);
}

/* The process settings (group, death signal, signals, stdio, personality, CPUs, THP, core dumps). */
static int confine_process(const struct sl_cfg *cfg)
{
    if (cfg->new_pgrp && setpgid(0, 0) < 0) { fail(cfg, SL_STEP_SETPGID, errno); return -1; }
    if (cfg->pdeathsig) {
        if (prctl(PR_SET_PDEATHSIG, cfg->pdeathsig) < 0) { fail(cfg, SL_STEP_PDEATHSIG, errno); return -1; }
        if (cfg->parent_pid && getppid() != cfg->parent_pid) { fail(cfg, SL_STEP_PARENT_GONE, ESRCH); return -1; }
    }
    if (cfg->reset_signals) {
        /* Python ignores SIGPIPE and SIGXFSZ, and ignored dispositions survive exec: restore them (as
           subprocess does). Handlers reset themselves at exec; other ignores are the caller's to pass on. */
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = SIG_DFL;
        sigaction(SIGPIPE, &sa, NULL);
        sigaction(SIGXFSZ, &sa, NULL);
        sigset_t none;
        sigemptyset(&none);
        if (sigprocmask(SIG_SETMASK, &none, NULL) < 0) { fail(cfg, SL_STEP_SIGNALS, errno); return -1; }
    }
    for (int i = 0; i < 3; i++) {
        int fd = cfg->stdio[i];
        if (fd < 0 || fd == i) {
            if (fd == i && fcntl(i, F_SETFD, 0) < 0) { fail(cfg, SL_STEP_STDIO, errno); return -1; }
            continue;
        }
        if (dup2(fd, i) < 0) { fail(cfg, SL_STEP_STDIO, errno); return -1; }
    }
    if (cfg->personality_flags && personality(cfg->personality_flags) < 0) {
        fail(cfg, SL_STEP_PERSONALITY, errno); return -1;
    }
    if (cfg->cpu_mask_len > 0 &&
        sched_setaffinity(0, (size_t)cfg->cpu_mask_len, (const cpu_set_t *)cfg->cpu_mask) < 0) {
        fail(cfg, SL_STEP_AFFINITY, errno); return -1;
    }
    if (cfg->thp_disable && prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) < 0) { fail(cfg, SL_STEP_THP, errno); return -1; }
    if (cfg->no_coredump) {
        struct rlimit rl = { 0, 0 };
        if (setrlimit(RLIMIT_CORE, &rl) < 0) { fail(cfg, SL_STEP_CORE, errno); return -1; }
    }
    return 0;
}

/* The working directory, NO_NEW_PRIVS, Landlock, seccomp, the hand-off, fds and RLIMIT_NOFILE. */
static int confine_rest(const struct sl_cfg *cfg)
{
    int listener = -1;
    if (cfg->cwd && chdir(cfg->cwd) < 0) { fail(cfg, SL_STEP_CHDIR, errno); return -1; }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) { fail(cfg, SL_STEP_NNP, errno); return -1; }
    if (cfg->landlock_fd >= 0) {
        if (syscall(SYS_landlock_restrict_self, cfg->landlock_fd, cfg->landlock_flags) < 0) {
            fail(cfg, SL_STEP_LANDLOCK, errno); return -1;
        }
        close(cfg->landlock_fd);
    }
    /* Anything the child calls between seccomp() and the hand-off may be notified with no supervisor yet
       to answer it (a user handler on getpid would deadlock): ask for the pid while nothing is filtered. */
    int32_t pid = self_pid();
    if (cfg->filter_len > 0) {
        struct sock_fprog prog = { cfg->filter_len, (struct sock_filter *)cfg->filter };
        long r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, cfg->seccomp_flags, &prog);
        if (r < 0 && errno == EINVAL && (cfg->seccomp_flags & SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV))
            r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                        cfg->seccomp_flags & ~SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, &prog);
        if (r < 0) { fail(cfg, SL_STEP_SECCOMP, errno); return -1; }
        if (cfg->seccomp_flags & SECCOMP_FILTER_FLAG_NEW_LISTENER) listener = (int)r;
    }
    /* A second, listener-less filter: used when the first one must stay minimal (allowlist mode keeps
       the hand-off syscalls reachable until here). */
    if (cfg->filter2_len > 0) {
        struct sock_fprog prog = { cfg->filter2_len, (struct sock_filter *)cfg->filter2 };
        if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0) {
            fail(cfg, SL_STEP_FILTER2, errno); return -1;
        }
    }
    if (cfg->sock_fd >= 0) {
        long r;
        struct sl_msg m = { listener >= 0 ? (cfg->handoff_scm ? 'L' : 'N') : 'R', 0, 0, listener, pid };
        if (listener >= 0 && cfg->handoff_scm)
            r = send_msg_fd(cfg->sock_fd, &m, sizeof(m), listener);
        else
            r = write(cfg->sock_fd, &m, sizeof(m)) == (ssize_t)sizeof(m) ? 0 : -errno;
        if (r < 0) { fail(cfg, SL_STEP_HANDOFF, (int)-r); return -1; }
        /* The parent now holds (or will pidfd_getfd) its own copy. Ours is O_CLOEXEC, so exec drops it; with
           hand-off by number the parent still needs it until it answers, so close only after "ready". Without
           a listener there is nothing to wait for: no supervisor, and the parent prepares nothing (a round
           trip less per run: the pytest plugin's seccomp-only tests). */
        if (listener >= 0) {
            char go;
            ssize_t n;
            do { n = read(cfg->sock_fd, &go, 1); } while (n < 0 && errno == EINTR);
            if (n != 1 || go != 'G') { fail(cfg, SL_STEP_READY, n < 0 ? errno : EPIPE); return -1; }
            close(listener);
        }
    }
    if (cfg->close_fds) {
        /* Keep the caller's list plus the hand-off socket (close-on-exec: it reports an exec failure). */
        int keep[65], n = 0;
        for (int i = 0; i < cfg->n_keep_fds && n < 64; i++) keep[n++] = cfg->keep_fds[i];
        if (cfg->sock_fd >= 0) keep[n++] = cfg->sock_fd;
        for (int i = 1; i < n; i++)
            for (int j = i; j > 0 && keep[j - 1] > keep[j]; j--) { int t = keep[j]; keep[j] = keep[j - 1]; keep[j - 1] = t; }
        if (close_fds_except(keep, n) < 0) { fail(cfg, SL_STEP_CLOSE_FDS, errno); return -1; }
    }
    if (cfg->nofile >= 0) {
        struct rlimit rl = { (rlim_t)cfg->nofile, (rlim_t)cfg->nofile };
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0) { fail(cfg, SL_STEP_NOFILE, errno); return -1; }
    }
    return 0;
}

/* Try each candidate path like execvp does: ENOENT/ENOTDIR move on, anything else is remembered. */
static int exec_candidates(const struct sl_cfg *cfg)
{
    int saved = ENOENT;
    for (int i = 0; i < cfg->n_exec_paths; i++) {
        execve(cfg->exec_paths[i], cfg->argv, cfg->envp);
        if (errno != ENOENT && errno != ENOTDIR) saved = errno;
        if (errno == E2BIG || errno == ENOMEM || errno == ETXTBSY) break;
    }
    return saved;
}

/*
 * The reaper: a small process between the caller and the sandbox. It is a child subreaper, so every process
 * of the sandbox that loses its parent is re-parented to it and none can slip away to init. When the
 * sandbox's root process exits, when asked (SIGUSR1), or when the caller dies (PDEATHSIG = SIGUSR1), it
 * SIGKILLs its children generation by generation until none is left, reports, and exits. It runs C only.
 */
struct sl_report { char kind; char pad[3]; int32_t val; };

static int reaper_report_fd = -1;

static void report(char kind, int val)
{
    struct sl_report r = { kind, { 0, 0, 0 }, val };
    if (reaper_report_fd >= 0) write_all(reaper_report_fd, (const char *)&r, sizeof(r));
}

static void put_uint(char *dst, unsigned v)
{
    char tmp[12]; int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) *dst++ = tmp[--n];
    *dst = 0;
}

/* Kill and reap every child; the orphans of the killed come back to us (subreaper), so repeat. */
static void kill_all_children(void)
{
    char path[64] = "/proc/self/task/";
    put_uint(path + strlen(path), (unsigned)getpid());
    strcat(path, "/children");
    for (int round = 0; round < 10000; round++) {
        pid_t pids[512];
        int found = 0;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            char buf[4096];
            ssize_t n;
            unsigned cur = 0; int in = 0;
            while ((n = read(fd, buf, sizeof(buf))) > 0) {
                for (ssize_t i = 0; i <= n; i++) {
                    if (i < n && buf[i] >= '0' && buf[i] <= '9') { cur = cur * 10 + (unsigned)(buf[i] - '0'); in = 1; }
                    else if (in) {
                        kill((pid_t)cur, SIGKILL);
                        if (found < 512) pids[found] = (pid_t)cur;
                        found++; cur = 0; in = 0;
                    }
                }
            }
            close(fd);
        }
        int st;
        pid_t w;
        /* Reap what we killed (their orphans are re-parented to us before they become reapable). */
        for (int i = 0; i < found && i < 512; i++) while (waitpid(pids[i], &st, __WALL) < 0 && errno == EINTR) {}
        while ((w = waitpid(-1, &st, __WALL | WNOHANG)) > 0) {}
        if (w < 0 && errno == ECHILD) return;
        if (!found && fd < 0) {  /* no /proc: a blocking wait is all we can do */
            if (waitpid(-1, &st, __WALL) < 0 && errno == ECHILD) return;
        }
    }
}

static void on_reaper_signal(int sig)
{
    kill_all_children();
    report('K', sig);
    _exit(0);
}

struct exec_args { const struct sl_cfg *cfg; };

static int exec_child(void *p)
{
    const struct sl_cfg *cfg = ((struct exec_args *)p)->cfg;
    if (sl_confine(cfg) < 0) _exit(127);
    int err = exec_candidates(cfg);
    fail(cfg, SL_STEP_EXEC, err);
    _exit(127);
}

/* ---- pid namespace (isolate_pids where the kernel allows it; procfs.py, plan.py) ----
 *
 * The reaper clones the sandbox's first process R with CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID (a plain copy,
 * not CLONE_VFORK: R never execs) and writes its id maps from outside. R is pid 1 there: it makes the mount
 * tree private, mounts a /proc of the new pid namespace over /proc (nosuid,nodev,noexec), then starts the
 * program P as pid 2 (CLONE_VM|CLONE_VFORK, so R waits for its exec) and stays a tiny init: it reaps every
 * process of the namespace and forwards the signals sent to it to P. When P ends, R SIGKILLs and reaps what is
 * left in the namespace (the reaper did the same without one), writes P's raw wait status and the CPU time of
 * what it reaped to the reaper (status pipe), and exits. Killing R kills the whole namespace (timeout, kill(),
 * the caller's death).
 * P, not R, runs the program: pid 1 ignores default-action signals from its own namespace, P keeps normal
 * signal semantics. R runs no program code, holds no fd, and has no Landlock domain: the program cannot
 * ptrace it or read its /proc entries (Landlock), nor kill it (pid 1 of its namespace).
 */
static int pidns_status_fd = -1;  /* R: the write end of the status pipe; the reaper: the read end */
static int pidns_old_proc = -1;   /* R, then P: the caller's /proc, to learn P's pid in the caller's namespace */
static volatile pid_t pidns_prog; /* R: P's pid (2) */

static int read_pid_link(int dirfd, const char *name)
{
    char buf[16];
    ssize_t n = readlinkat(dirfd, name, buf, sizeof(buf) - 1);
    if (n <= 0) return -1;
    int v = 0;
    for (ssize_t i = 0; i < n; i++) {
        if (buf[i] < '0' || buf[i] > '9') return -1;
        v = v * 10 + (buf[i] - '0');
    }
    return v > 1 ? v : -1;
}

/* The id maps of the user namespace of process `pid` (0: this process, from inside), written for a caller
   with ids uid/gid (read before the new namespace: inside they are 65534 until mapped). Unprivileged: its
   own uid/gid only (all the kernel allows; other ids show as the overflow id 65534). Root, from the parent
   namespace (pid != 0): the identity map of every id, so nothing the program sees changes (file owners,
   root's access to other users' files, setgroups). 0 or -errno. */
static int pidns_id_maps(pid_t pid, unsigned uid, unsigned gid)
{
    char path[64] = "/proc/", line[64];
    size_t dir;
    int r;
    if (pid) put_uint(path + strlen(path), (unsigned)pid); else strcat(path, "self");
    strcat(path, "/");
    dir = strlen(path);
    if (uid == 0 && pid) {
        strcpy(path + dir, "uid_map");
        if ((r = write_text(path, "0 0 4294967295\n")) < 0) return r;
        strcpy(path + dir, "gid_map");
        return write_text(path, "0 0 4294967295\n");
    }
    id_map_line(line, uid, uid);
    strcpy(path + dir, "uid_map");
    if ((r = write_text(path, line)) < 0) return r;
    strcpy(path + dir, "setgroups");
    if ((r = write_text(path, "deny")) < 0 && r != -ENOENT) return r;
    id_map_line(line, gid, gid);
    strcpy(path + dir, "gid_map");
    return write_text(path, line);
}

/* Landlock rules are on inodes: the policy's rules on /proc (and below) named the caller's procfs. The same
   names in the new /proc get the same rights, added to this run's own ruleset (procfs.py builds one per run:
   on the plan's shared ruleset such rules would pile up). A name the new /proc lacks is skipped. */
static int pidns_proc_rules(const struct sl_cfg *cfg)
{
    for (int i = 0; i < cfg->n_ns_proc; i++) {
        int fd = open(cfg->ns_proc_paths[i], O_PATH | O_CLOEXEC);
        if (fd < 0) {
            if (errno == ENOENT) continue;
            fail(cfg, SL_STEP_NS_LANDLOCK, errno); return -1;
        }
        struct __attribute__((packed)) { uint64_t allowed_access; int32_t parent_fd; } a =
            { cfg->ns_proc_rights[i], fd };
        long r = syscall(SYS_landlock_add_rule, cfg->landlock_fd, 1 /* LANDLOCK_RULE_PATH_BENEATH */, &a, 0);
        int err = errno;
        close(fd);
        if (r < 0) { fail(cfg, SL_STEP_NS_LANDLOCK, err); return -1; }
    }
    return 0;
}

static int pidns_sync_fd = -1;  /* R: the read end of "the reaper wrote your id maps" */

/* In R: make mounts private, mount the new /proc (while the reaper writes the id maps: the mounts need only
   R's capabilities in its namespace), then wait for the maps. The caller's /proc stays reachable through
   pidns_old_proc only. */
static int pidns_setup(const struct sl_cfg *cfg)
{
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) { fail(cfg, SL_STEP_NS_PRIVATE, errno); return -1; }
    pidns_old_proc = open("/proc", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (pidns_old_proc < 0) { fail(cfg, SL_STEP_NS_HOSTPID, errno); return -1; }
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) {
        fail(cfg, SL_STEP_NS_PROC, errno); return -1;
    }
    if (pidns_proc_rules(cfg) < 0) return -1;
    char go = 0;
    ssize_t n;
    do { n = read(pidns_sync_fd, &go, 1); } while (n < 0 && errno == EINTR);
    if (n != 1) _exit(127);  /* the reaper reported why */
    close(pidns_sync_fd);
    /* Gaining capabilities in the new user namespace made us non-dumpable: the supervisor needs pidfd_getfd
       and /proc/<pid>/mem on the program, as on any sandbox. */
    if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) < 0) { fail(cfg, SL_STEP_NS_DUMPABLE, errno); return -1; }
    return 0;
}

/* P (pid 2): its own group when asked (the supervisor signals the group of the pid it hands over), then the
   rest of the confinement and exec. */
static int pidns_program(void *p)
{
    const struct sl_cfg *cfg = ((struct exec_args *)p)->cfg;
    int hp = read_pid_link(pidns_old_proc, "self");
    if (hp < 0) { fail(cfg, SL_STEP_NS_HOSTPID, errno ? errno : EIO); _exit(127); }
    host_pid = hp;  /* shared with R (CLONE_VM), which no longer reports anything on the socket */
    close(pidns_old_proc);
    if (cfg->new_pgrp && setpgid(0, 0) < 0) { fail(cfg, SL_STEP_SETPGID, errno); _exit(127); }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0) { fail(cfg, SL_STEP_PDEATHSIG, errno); _exit(127); }
    if (confine_rest(cfg) < 0) _exit(127);
    int err = exec_candidates(cfg);
    fail(cfg, SL_STEP_EXEC, err);
    _exit(127);
}

/* What R hands the reaper: the program's raw wait status and the CPU time of everything R reaped. */
struct pidns_end_msg { int32_t status; int32_t cpu_ms; };

/* The program ended: kill and reap the rest of the namespace here (the kernel would at R's exit, but tearing
   the namespaces down takes a while), then hand over. The reaper reports the end at once; R's own exit, with
   the teardown, is off the caller's path. */
static void pidns_end(int st)
{
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    kill(-1, SIGKILL);  /* from pid 1: every other process of the namespace */
    int s2;
    /* again after each reap: cheap insurance against a process made while the first kill went round */
    while (waitpid(-1, &s2, __WALL) > 0 || errno == EINTR) kill(-1, SIGKILL);
    struct rusage ru;
    long ms = 0;
    if (getrusage(RUSAGE_CHILDREN, &ru) == 0)
        ms = (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000L + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1000;
    struct pidns_end_msg m = { st, ms > 0x7fffffffL ? 0x7fffffff : (int32_t)ms };
    write_all(pidns_status_fd, (const char *)&m, sizeof(m));
    _exit(0);
}

static void pidns_forward(int sig)
{
    int saved = errno;
    if (pidns_prog > 0) kill(pidns_prog, sig);
    errno = saved;
}

/* R is a copy of the caller: its /proc/1/cmdline (readable by every process of the namespace, no ptrace check)
   would show the caller's argv. Blank it (R's own copy-on-write pages) and name it sandlock-init. */
static void pidns_blank_cmdline(void)
{
    char buf[1024];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;
    if (fd >= 0) close(fd);
    prctl(PR_SET_NAME, "sandlock-init", 0, 0, 0);
    if (n <= 0) return;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    unsigned long field[52] = { 0 };
    int k = 2;  /* fields 1 and 2 (pid, comm) end at ')' */
    for (p = p ? p + 1 : buf; *p && k < 51; ) {
        while (*p == ' ') p++;
        if (!*p) break;
        k++;
        unsigned long v = 0;
        while (*p >= '0' && *p <= '9') v = v * 10 + (unsigned long)(*p++ - '0');
        field[k] = v;
        while (*p && *p != ' ') p++;
    }
    unsigned long start = field[48], end = field[49];  /* arg_start, arg_end (proc(5)) */
    if (start && end > start && end - start < (1UL << 20)) memset((void *)start, 0, end - start);
}

/* R after P's exec: hold nothing, forward signals, reap everything, then pidns_end. */
static void pidns_init_loop(const struct sl_cfg *cfg, pid_t prog)
{
    /* Non-dumpable again first (PR_SET_DUMPABLE was for the program, now exec'd): R holds a copy of the
       caller's memory and fds, so /proc/1/mem, ptrace and pidfd_getfd need capabilities over the caller's
       user namespace, on top of Landlock's domain check. Only then close and blank (a shorter window). */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    int keep[1] = { pidns_status_fd };
    close_fds_except_from(0, keep, 1);
    pidns_blank_cmdline();
    pidns_prog = prog;
    struct sigaction fw, ign;
    memset(&fw, 0, sizeof(fw));
    memset(&ign, 0, sizeof(ign));
    fw.sa_handler = pidns_forward;
    fw.sa_flags = SA_RESTART;
    ign.sa_handler = SIG_IGN;
    /* Terminal signals reach P directly when it shares the caller's (foreground) group: forwarding them
       would deliver each twice. In its own group only a signal sent to R itself reaches R. */
    int tty[] = { SIGINT, SIGQUIT, SIGHUP, SIGWINCH, SIGTSTP, SIGTTIN, SIGTTOU };
    int other[] = { SIGTERM, SIGUSR1, SIGUSR2, SIGALRM };
    for (unsigned i = 0; i < sizeof(tty) / sizeof(tty[0]); i++)
        sigaction(tty[i], cfg->new_pgrp && tty[i] != SIGTSTP && tty[i] != SIGTTIN && tty[i] != SIGTTOU
                  ? &fw : &ign, NULL);
    for (unsigned i = 0; i < sizeof(other) / sizeof(other[0]); i++) sigaction(other[i], &fw, NULL);
    sigaction(SIGPIPE, &ign, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (;;) {
        int st;
        pid_t w = waitpid(-1, &st, __WALL);
        if (w == prog) pidns_end(st);
        if (w < 0 && errno == ECHILD) _exit(0);
    }
}

/* R's entry (clone from the reaper): pid 1 of the new namespaces. */
static int pidns_init(void *p)
{
    const struct sl_cfg *cfg = ((struct exec_args *)p)->cfg;
    /* The caller's /proc is still mounted: its "self" names R in the caller's namespace (what fail() reports;
       never pid 1, which would name the caller's init). */
    int hp = read_pid_link(AT_FDCWD, "/proc/self");
    if (hp < 0) { host_pid = -1; fail(cfg, SL_STEP_NS_HOSTPID, errno ? errno : EIO); _exit(127); }
    host_pid = hp;
    if (confine_process(cfg) < 0) _exit(127);
    if (pidns_setup(cfg) < 0) _exit(127);
    size_t stack_size = 256 * 1024;
    char *stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) { fail(cfg, SL_STEP_SPAWN, errno); _exit(127); }
    pid_t prog = clone(pidns_program, stack + stack_size, CLONE_VM | CLONE_VFORK | SIGCHLD, p);
    if (prog < 0) { fail(cfg, SL_STEP_SPAWN, errno); _exit(127); }
    pidns_init_loop(cfg, prog);
    _exit(0);
}

/* The reaper's start of R; returns R's pid or -1 (reported). Keeps the status pipe's read end. The id maps
   are written from here, the parent namespace: only there may root map every id. */
static pid_t pidns_start(const struct sl_cfg *cfg, char *stack_top, struct exec_args *args)
{
    int sp[2], sync[2];
    if (pipe2(sp, O_CLOEXEC) < 0 || pipe2(sync, O_CLOEXEC) < 0) { fail(cfg, SL_STEP_SPAWN, errno); return -1; }
    pidns_status_fd = sp[1];
    pidns_sync_fd = sync[0];
    pid_t root = clone(pidns_init, stack_top, CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | SIGCHLD, args);
    int err = errno;
    close(sp[1]);
    close(sync[0]);
    pidns_status_fd = sp[0];
    if (root < 0) { fail(cfg, SL_STEP_NS_PIDNS, err); return -1; }
    int r = pidns_id_maps(root, (unsigned)geteuid(), (unsigned)getegid());
    if (r < 0) { kill(root, SIGKILL); fail(cfg, SL_STEP_NS_IDMAP, -r); return -1; }
    write_all(sync[1], "G", 1);
    close(sync[1]);
    return root;
}

/* The reaper under a pid namespace: the end comes from R's status pipe (R killed and reaped the namespace
   before writing), so it is reported without waiting for R's exit; EOF means R died first (killed: its
   namespace dies with it), and R's own status is reported once it is reaped. */
static void pidns_reaper_wait(pid_t root)
{
    struct pidns_end_msg m;
    ssize_t n;
    do { n = read(pidns_status_fd, &m, sizeof(m)); } while (n < 0 && errno == EINTR);
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    if (n == (ssize_t)sizeof(m)) {
        report('C', m.cpu_ms);
        report('X', m.status);
        while (waitpid(root, NULL, __WALL) < 0 && errno == EINTR) {}
        kill_all_children();
        _exit(0);
    }
    int st = 0x7f00;
    while (waitpid(root, &st, __WALL) < 0 && errno == EINTR) {}
    report('X', st);
    kill_all_children();
    _exit(0);
}

static void reaper_setup(const struct sl_cfg *cfg, pid_t caller)
{
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    prctl(PR_SET_PDEATHSIG, SIGUSR1, 0, 0, 0);
    if (getppid() != caller) _exit(127);
    reaper_report_fd = cfg->report_fd;
}

static void reaper_loop(pid_t root, const int *keep, int nkeep)
{
    /* Hold nothing of the caller's: an inherited pipe end would keep its reader from seeing EOF. */
    close_fds_except_from(0, keep, nkeep);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_reaper_signal;
    sigfillset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    /* Terminal signals are for the sandboxed command, not for its keeper. */
    struct sigaction ign;
    memset(&ign, 0, sizeof(ign));
    ign.sa_handler = SIG_IGN;
    int ignored[] = { SIGINT, SIGQUIT, SIGHUP, SIGTSTP, SIGTTIN, SIGTTOU, SIGPIPE };
    for (unsigned i = 0; i < sizeof(ignored) / sizeof(ignored[0]); i++) sigaction(ignored[i], &ign, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    report('P', root);
    if (pidns_status_fd >= 0) pidns_reaper_wait(root);
    for (;;) {
        int st;
        pid_t w = waitpid(-1, &st, __WALL);
        if (w == root) {
            sigset_t all;
            sigfillset(&all);
            sigprocmask(SIG_SETMASK, &all, NULL);
            kill_all_children();
            report('X', st);
            _exit(0);
        }
        if (w < 0 && errno == ECHILD) { report('X', 0x7f00); _exit(0); }
    }
}

/*
 * Spawn a sandboxed command: fork the reaper, which starts the root child with clone(CLONE_VM|CLONE_VFORK)
 * (no second copy of the caller's page tables) and supervises its lifetime. Returns the reaper's pid or
 * -errno. The root's pid arrives on the hand-off socket (and as 'P' on report_fd).
 */
long sl_spawn(const struct sl_cfg *cfg)
{
    pid_t caller = getpid();
    pid_t pid = fork();
    if (pid < 0) return -errno;
    if (pid > 0) return pid;
    reaper_setup(cfg, caller);
    size_t stack_size = 256 * 1024;
    char *stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) { fail(cfg, SL_STEP_SPAWN, errno); _exit(127); }
    struct exec_args args = { cfg };
    pid_t root;
    if (cfg->ns_pid) {
        if ((root = pidns_start(cfg, stack + stack_size, &args)) < 0) {
            kill_all_children();
            _exit(127);
        }
    } else {
        root = clone(exec_child, stack + stack_size, CLONE_VM | CLONE_VFORK | SIGCHLD, &args);
        if (root < 0) { fail(cfg, SL_STEP_SPAWN, errno); _exit(127); }
    }
    int keep[2] = { cfg->report_fd, pidns_status_fd }, nkeep = pidns_status_fd >= 0 ? 2 : 1;
    if (nkeep == 2 && keep[1] < keep[0]) { keep[0] = pidns_status_fd; keep[1] = cfg->report_fd; }  /* sorted */
    reaper_loop(root, keep, nkeep);
    _exit(0);
}

/*
 * For a confined Python function (the pytest plugin): called in a single-threaded child of os.fork(). Forks
 * again; the new child returns 0 and goes on in Python (it then calls sl_confine); this process becomes the
 * reaper and never returns.
 */
long sl_fork_with_reaper(const struct sl_cfg *cfg)
{
    if (cfg->ns_pid) return -EINVAL;  /* the confined function goes on in Python: no init can stand above it */
    pid_t caller = getppid();
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    prctl(PR_SET_PDEATHSIG, SIGUSR1, 0, 0, 0);
    if (getppid() != caller) _exit(127);
    reaper_report_fd = cfg->report_fd;
    pid_t root = fork();
    if (root < 0) return -errno;
    if (root == 0) return 0;
    int keep[1] = { cfg->report_fd };
    reaper_loop(root, keep, 1);
    _exit(0);
}

/* Wait for pid with a pidfd-style poll; returns 1 and the raw status, 0 on timeout, or -errno. */
long sl_wait_pidfd(int pidfd, int pid, int timeout_ms, int *status)
{
    struct pollfd p = { pidfd, POLLIN, 0 };
    int r;
    do { r = poll(&p, 1, timeout_ms); } while (r < 0 && errno == EINTR);
    if (r < 0) return -errno;
    if (r == 0) return 0;
    pid_t w;
    do { w = waitpid(pid, status, 0); } while (w < 0 && errno == EINTR);
    return w < 0 ? -errno : 1;
}

/* ==== COW fork section (forking.py; owner: the fork work) ================================================ */
#include <stdlib.h>      /* getenv, realloc */
#include <sys/epoll.h>
/*
 * Called in the single-threaded template. Makes n clones with the raw fork syscall (no glibc or Python fork
 * handlers: nothing to run for a single-threaded process; fork(2) itself is never a notified syscall). The
 * work is spread over `nworkers` forkers (the template and nworkers-1 helpers forked from it) so the
 * page-table copies use every CPU; forker w makes clones w, w+nworkers, ... and reaps them.
 *
 * The template returns n once every clone is reaped, with pids[i] and statuses[i] (raw wait status; -1 if
 * clone i could not be made) filled, or -errno if the bookkeeping could not be set up. Helpers never return.
 * Everything a clone runs here is a raw syscall: a libc call first made in a clone would be bound lazily
 * there (a symbol lookup and a copied GOT page per clone).
 */
static pid_t raw_fork(void)
{
#ifdef SYS_fork
    return (pid_t)syscall(SYS_fork);
#else
    return (pid_t)syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
#endif
}

/*
 * Can this process start a pid-namespace sandbox? In a throw-away child made as the sandbox's init is (a new
 * user + mount + pid namespace; it is pid 1 there): the id map, private mounts, and a /proc mounted for the
 * namespace (the step that container profiles and masked /proc mounts refuse). The child shares our memory
 * until it exits (CLONE_VM|CLONE_VFORK: no copy of this process's page tables) and runs raw calls only, with
 * every signal blocked (our handlers must not run in it). 0, or the errno of the first step that failed.
 */
struct pidns_probe { unsigned uid, gid; int result; };

static int pidns_probe_child(void *p)
{
    struct pidns_probe *pr = p;
    int r = pidns_id_maps(0, pr->uid, pr->gid);  /* from inside: the one-id map (root's full one is written
                                                    from outside, which needs nothing this probe could miss) */
    if (r == 0 && mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) r = -errno;
    if (r == 0 && mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) r = -errno;
    pr->result = -r;
    syscall(SYS_exit_group, 0);
    return 0;
}

long sl_pidns_probe(void)
{
    struct pidns_probe pr = { (unsigned)geteuid(), (unsigned)getegid(), EIO };
    size_t size = 64 * 1024;
    char *stack = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) return -errno;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t pid = clone(pidns_probe_child, stack + size,
                      CLONE_VM | CLONE_VFORK | CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | SIGCHLD, &pr);
    int err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    munmap(stack, size);
    if (pid < 0) return err;
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
    return pr.result;
}

/* The end of a clone (after Python flushed its streams): exit_group without libc's atexit work. */
void sl_clone_exit(int code)
{
    for (;;) syscall(SYS_exit_group, code & 0xff);
}

/*
 * CLONE_ID in the C environment without setenv in every clone (setenv mallocs and rebalances glibc's tree of
 * known values: dozens of copied pages per clone). The template sets CLONE_ID to a run of zeros; this keeps a
 * pointer to that value, and each clone writes its decimal id over it (one page).
 */
static char *clone_id_slot;
static size_t clone_id_room;

long sl_fork_env_slot(void)
{
    char *v = getenv("CLONE_ID");
    clone_id_slot = v;
    clone_id_room = v ? strlen(v) : 0;
    return v ? (long)clone_id_room : -1;
}

static void put_clone_id(int id)
{
    char digits[12];
    int nd = 0;
    unsigned u = (unsigned)id;
    do { digits[nd++] = (char)('0' + u % 10); u /= 10; } while (u && nd < 11);
    if (!clone_id_slot || (size_t)nd > clone_id_room) return;
    for (int k = 0; k < nd; k++) clone_id_slot[k] = digits[nd - 1 - k];
    clone_id_slot[nd] = '\0';
}

struct sl_batch_msg { char kind; char pad[3]; uint32_t start; uint32_t count; uint32_t stride; };

static long send_fds(int sock, const void *data, size_t len, const int *fds, int nfds)
{
    struct iovec iov = { (void *)data, len };
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int) * 64)]; } u;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                          .msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds) };
    memset(u.buf, 0, sizeof(u.buf));
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET; c->cmsg_type = SCM_RIGHTS; c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    long r;
    do { r = sendmsg(sock, &msg, MSG_NOSIGNAL); } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

/* The batch's write ends as one fd range lo..hi when nothing but the batch's own pipes lies inside it (lowest-
 * free allocation packs them unless the template's fd table has holes): 1, else 0 (close them one by one). */
static int batch_range(const int *rd, const int *wr, int cnt, int *lo, int *hi)
{
    int a = wr[0], b = wr[0], all_lo = wr[0], all_hi = wr[0];
    for (int k = 0; k < cnt; k++) {
        if (wr[k] < a) a = wr[k];
        if (wr[k] > b) b = wr[k];
        if (rd[k] < all_lo) all_lo = rd[k];
        if (rd[k] > all_hi) all_hi = rd[k];
    }
    if (a < all_lo) all_lo = a;
    if (b > all_hi) all_hi = b;
    *lo = a; *hi = b;
    return all_hi - all_lo + 1 == 2 * cnt;
}

/* In clone k of a batch: its pipe becomes stdout, every other descriptor of the fork machinery goes. */
static void clone_setup(const int *wr, int cnt, int k, int contiguous, int lo, int hi, int sock, void *shm,
                        size_t len)
{
    /* fd 1 is normally open (the template's stdout), so no write end is 1; if it was closed, one may be. */
    if (wr[k] == 1) syscall(SYS_fcntl, 1, F_SETFD, 0);
    else if (syscall(SYS_dup3, wr[k], 1, 0) < 0) syscall(SYS_exit_group, 126);
    if (lo <= 2 || !contiguous || syscall(SYS_close_range, (unsigned)lo, (unsigned)hi, 0) < 0)
        for (int j = 0; j < cnt; j++) if (wr[j] != 1) syscall(SYS_close, wr[j]);
    syscall(SYS_close, sock);
    syscall(SYS_munmap, shm, len);
}

/*
 * Clones `first`..`first+n-1`. Forker w makes clones w, w+nworkers, ... in batches of at most `batch` (<= 64):
 * a pipe per clone, the batch's read ends sent to the caller on `sock` (one 'B' message: start, count,
 * stride) and closed, then the forks; so a clone inherits only its own batch's write ends (one close_range).
 * Clone first+i returns i.
 */
long sl_fork_clones(int first, int n, int sock, int nworkers, int batch, int *pids, int *statuses)
{
    if (n <= 0) return 0;
    if (nworkers < 1) nworkers = 1;
    if (nworkers > n) nworkers = n;
    if (nworkers > 64) nworkers = 64;
    if (batch < 1 || batch > 64) batch = 64;
    size_t len = (size_t)n * 2 * sizeof(int);
    int *shm = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shm == MAP_FAILED) return -errno;
    int *spids = shm, *sstat = shm + n;
    for (int i = 0; i < n; i++) { spids[i] = 0; sstat[i] = -1; }
    pid_t helpers[64];
    int me = 0;
    for (int w = 1; w < nworkers; w++) {
        pid_t h = raw_fork();
        if (h == 0) { me = w; break; }
        helpers[w] = h;   /* h < 0: that share is made by nobody; those clones stay "not made" */
    }
    int stop = 0;
    for (int i = me; i < n && !stop; ) {
        int rd[64], wr[64], idx[64], cnt = 0;
        for (int k = i; k < n && cnt < batch; k += nworkers) {
            int p[2];
            if (pipe2(p, O_CLOEXEC) < 0) { stop = 1; break; }
            rd[cnt] = p[0]; wr[cnt] = p[1]; idx[cnt] = k; cnt++;
        }
        if (cnt == 0) break;
        struct sl_batch_msg m = { 'B', { 0, 0, 0 }, (uint32_t)(first + i), (uint32_t)cnt, (uint32_t)nworkers };
        if (send_fds(sock, &m, sizeof(m), rd, cnt) < 0) stop = 1;
        for (int k = 0; k < cnt; k++) close(rd[k]);
        int lo, hi, contiguous = batch_range(rd, wr, cnt, &lo, &hi);
        for (int k = 0; k < cnt && !stop; k++) {
            pid_t pid = raw_fork();
            if (pid == 0) {
                clone_setup(wr, cnt, k, contiguous, lo, hi, sock, shm, len);
                put_clone_id(first + idx[k]);
                return idx[k];
            }
            if (pid < 0) { stop = 1; break; }
            spids[idx[k]] = (int)pid;
        }
        for (int k = 0; k < cnt; k++) close(wr[k]);
        i = idx[cnt - 1] + nworkers;
    }
    for (int i = me; i < n; i += nworkers) {
        if (spids[i] <= 0) continue;
        int st;
        while (waitpid(spids[i], &st, 0) < 0) { if (errno != EINTR) { st = -1; break; } }
        sstat[i] = st;
    }
    if (me != 0) _exit(0);
    for (int w = 1; w < nworkers; w++) {
        if (helpers[w] <= 0) continue;
        int st;
        while (waitpid(helpers[w], &st, 0) < 0 && errno == EINTR) {}
    }
    for (int i = 0; i < n; i++) { pids[i] = spids[i]; statuses[i] = sstat[i]; }
    munmap(shm, len);
    return n;
}
/*
 * The caller's side of fork(n): every clone's stdout pipe in one epoll set, read here. A pipe's epoll data is
 * (fd << 32 | clone index); the control socket's is its fd (high half 0), and
 * sl_fork_drain returns when it is readable so Python handles the message. outs[i].fd is the open read end of
 * clone i (-1 once closed), so Python can close what is left if it gives up.
 */
/* The control socket, with data = its fd and the high half 0 (Python's epoll.register leaves it unset). */
long sl_fork_watch_ctl(int epfd, int fd)
{
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = (uint32_t)fd };
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

long sl_fork_watch(int epfd, const int *fds, int nfds, int first, int stride, struct sl_out *outs, int n)
{
    for (int k = 0; k < nfds; k++) {
        int i = first + k * stride;
        if (i < 0 || i >= n) return -EINVAL;
        outs[i].fd = fds[k];
        struct epoll_event ev = { .events = EPOLLIN, .data.u64 = ((uint64_t)(uint32_t)fds[k] << 32) | (uint32_t)i };
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fds[k], &ev) < 0) return -errno;
    }
    return 0;
}

/* Append what pipe `fd` holds to out; 1 when the pipe is finished (EOF, or writer gone and drained). */
static int drain_pipe(int fd, uint32_t events, struct sl_out *out)
{
    for (;;) {
        if (out->cap - out->len < 4096) {
            size_t cap = out->cap ? out->cap * 2 : 4096;
            char *p = realloc(out->data, cap);
            if (!p) return -ENOMEM;
            out->data = p; out->cap = cap;
        }
        size_t want = out->cap - out->len;
        ssize_t got = read(fd, out->data + out->len, want);
        if (got < 0) return errno == EINTR ? 0 : (errno == EAGAIN ? 0 : 1);
        if (got == 0) return 1;
        out->len += (size_t)got;
        if ((size_t)got < want) return (events & EPOLLHUP) ? 1 : 0;  /* emptied; with no writer left: done */
    }
}

/* One wait: >= 0 pipes closed meanwhile, plus SL_FORK_CTL if the control socket is readable and
 * SL_FORK_IDLE if nothing happened within timeout_ms; -errno on failure. */
long sl_fork_drain(int epfd, int timeout_ms, struct sl_out *outs, int n)
{
    struct epoll_event evs[128];
    int r = epoll_wait(epfd, evs, 128, timeout_ms);
    if (r < 0) return errno == EINTR ? 0 : -errno;
    if (r == 0) return SL_FORK_IDLE;
    long closed = 0, flags = 0;
    for (int e = 0; e < r; e++) {
        uint64_t d = evs[e].data.u64;
        if ((d >> 32) == 0) { flags |= SL_FORK_CTL; continue; }
        int fd = (int)(d >> 32);
        uint32_t i = (uint32_t)d;
        if (i >= (uint32_t)n || outs[i].fd != fd) continue;
        int done = drain_pipe(fd, evs[e].events, &outs[i]);
        if (done < 0) return done;
        if (done) { close(fd); outs[i].fd = -1; closed++; }
    }
    return closed | flags;
}

void sl_fork_outputs_free(struct sl_out *outs, int n)
{
    for (int i = 0; i < n; i++) { free(outs[i].data); outs[i].data = NULL; outs[i].len = outs[i].cap = 0; }
}
/* ==== end of the COW fork section ======================================================================= */

/* ==== deterministic execution (deterministic.py): getrandom answered in C ====================================
 *
 * With random_seed every getrandom(2) is notified. Python owns the seeded streams; for each process it keeps
 * the next bytes of its stream in a slot of `struct sl_det_fast` and maps the process's thread ids to that
 * slot. sl_det_wait_recv receives like sl_notif_wait_recv, but answers a getrandom itself when the caller's
 * slot holds enough bytes: check the notification is still valid (so the pid is still the caller's), write the
 * bytes into the caller's buffer, SEND the count. Anything else (another syscall, an unknown thread, too few
 * bytes left, odd flags) goes back to Python, which refills. Never CONTINUE: a getrandom the kernel ran would
 * return real random bytes.
 */
static unsigned det_hash(uint32_t tid) { return (tid * 2654435761u) & (SL_DET_MAP - 1); }

long sl_det_map_put(struct sl_det_fast *f, uint32_t tid, int32_t slot)
{
    if (tid == 0 || tid == SL_DET_TOMB || slot < 0 || slot >= SL_DET_SLOTS) return -EINVAL;
    unsigned h = det_hash(tid), spare = SL_DET_MAP;
    for (unsigned i = 0; i < SL_DET_MAP; i++, h = (h + 1) & (SL_DET_MAP - 1)) {
        uint32_t t = f->map[h].tid;
        if (t == tid) { f->map[h].slot = slot; return 0; }
        if (t == SL_DET_TOMB && spare == SL_DET_MAP) spare = h;
        if (t == 0) {
            if (spare == SL_DET_MAP) {
                if (f->used >= SL_DET_MAP / 2) return -ENOSPC;  /* keep probes short: Python rebuilds */
                f->used++;
                spare = h;
            }
            f->map[spare].tid = tid;
            f->map[spare].slot = slot;
            return 0;
        }
    }
    return -ENOSPC;
}

static int det_find(const struct sl_det_fast *f, uint32_t tid)
{
    unsigned h = det_hash(tid);
    for (unsigned i = 0; i < SL_DET_MAP; i++, h = (h + 1) & (SL_DET_MAP - 1)) {
        uint32_t t = f->map[h].tid;
        if (t == tid) return (int)h;
        if (t == 0) return -1;
    }
    return -1;
}

long sl_det_map_del(struct sl_det_fast *f, uint32_t tid)
{
    int h = det_find(f, tid);
    if (h < 0) return -ENOENT;
    f->map[h].tid = SL_DET_TOMB;  /* a tombstone keeps later probes going; `used` still counts it */
    f->map[h].slot = -1;
    return 0;
}

void sl_det_map_clear(struct sl_det_fast *f)
{
    memset(f->map, 0, sizeof f->map);
    f->used = 0;
}

/* Write `count` bytes into the caller's buffer and answer: the count, the bytes written when the buffer ends
 * early (as the kernel does), EFAULT when nothing could be written. A stale notification is left alone. */
long sl_det_answer(int listener, const struct seccomp_notif *n, const void *data, size_t count)
{
    uint64_t id = n->id;
    if (ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) != 0) return -errno;
    struct iovec l = { (void *)data, count }, r = { (void *)(uintptr_t)n->data.args[0], count };
    long w = process_vm_writev((pid_t)n->pid, &l, 1, &r, 1, 0);
    if (w > 0) return sl_notif_send(listener, n->id, w, 0, 0);
    return sl_notif_send(listener, n->id, 0, -EFAULT, 0);
}

/* The slot that can answer this notification now (a getrandom of a known thread, enough bytes), or NULL. */
static struct sl_det_slot *det_slot_for(struct sl_det_fast *f, const struct seccomp_notif *n)
{
    if (n->data.nr != f->nr || n->data.arch != f->arch) return NULL;
    uint64_t count = n->data.args[1];
    uint32_t flags = (uint32_t)n->data.args[2];  /* an unsigned int for the kernel: upper bits ignored */
    /* unknown flags, GRND_RANDOM|GRND_INSECURE (EINVAL) and count 0 are Python's to answer */
    if (flags & ~(uint32_t)SL_DET_GRND_FLAGS || (flags & 6) == 6 || count == 0) return NULL;
    int h = det_find(f, n->pid);
    if (h < 0) return NULL;
    struct sl_det_slot *s = &f->slots[f->map[h].slot];
    if (s->pos > s->len || count > s->len - s->pos) return NULL;
    return s;
}

long sl_det_wait_recv(struct sl_det_fast *f, int listener, int wake_fd, int timeout_ms, struct seccomp_notif *n)
{
    for (;;) {
        long r = sl_notif_wait_recv(listener, wake_fd, timeout_ms, n);
        if (r != 1) return r;
        struct sl_det_slot *s = det_slot_for(f, n);
        if (s == NULL) return 1;
        const unsigned char *p = s->buf + s->pos;
        s->pos += (uint32_t)n->data.args[1];
        sl_det_answer(listener, n, p, (size_t)n->data.args[1]);
        f->served++;
    }
}

/* ---- procfs (procfs.py): stat/access/open answered in C when the name is absolute and its walk, refusing magic
 * links, never leaves the root file system: then it is on no /proc or /sys mount (continue), or it is absent
 * and no link can appear later in a walk the kernel would redo (ENOENT). Anything else (relative names, /proc,
 * other mounts, long names) is left to the Python handlers. Only syscalls whose whole handler chain is procfs's
 * are listed in f->nr. Answers to a notification that went stale fail in the kernel, so the path read needs no
 * id check: if the notification is still pending, its task is alive and the pid was not reused. ---- */
#include <sys/stat.h>
#ifndef RESOLVE_NO_XDEV
#define RESOLVE_NO_XDEV 0x01
#define RESOLVE_NO_MAGICLINKS 0x02
#endif
struct sl_open_how { uint64_t flags, mode, resolve; };

/* The fields of one path syscall: path address, whether to follow the last link, whether it may create. */
static int proc_layout(int kind, const __u64 *a, uint64_t *addr, int *nofollow, int *creat)
{
    *nofollow = 0;
    *creat = 0;
    switch (kind) {
    case SL_PK_STAT: case SL_PK_ACCESS: *addr = a[0]; return 1;
    case SL_PK_LSTAT: *addr = a[0]; *nofollow = 1; return 1;
    case SL_PK_FSTATAT: case SL_PK_FACCESSAT2:
        *addr = a[1];
        *nofollow = ((uint32_t)a[3] & AT_SYMLINK_NOFOLLOW) != 0;
        return 1;
    case SL_PK_STATX: *addr = a[1]; *nofollow = ((uint32_t)a[2] & AT_SYMLINK_NOFOLLOW) != 0; return 1;
    case SL_PK_FACCESSAT: *addr = a[1]; return 1;
    case SL_PK_OPEN:  /* O_NOFOLLOW: a dangling last link is ELOOP for the kernel, not ENOENT */
        *addr = a[0];
        *creat = ((uint32_t)a[1] & O_CREAT) != 0;
        *nofollow = ((uint32_t)a[1] & O_NOFOLLOW) != 0;
        return 1;
    case SL_PK_OPENAT:
        *addr = a[1];
        *creat = ((uint32_t)a[2] & O_CREAT) != 0;
        *nofollow = ((uint32_t)a[2] & O_NOFOLLOW) != 0;
        return 1;
    }
    return 0;
}

static int proc_kernel_name(const char *p)
{
    return strncmp(p, "/proc", 5) == 0 || strncmp(p, "/sys", 4) == 0;
}

/* 1 if answered here, 0 if the Python handlers decide. */
static int proc_try(struct sl_proc_fast *f, int listener, const struct seccomp_notif *n)
{
    int kind = 0, nofollow, creat;
    uint64_t addr;
    if (n->data.arch != f->arch) return 0;
    for (int i = 0; i < f->n; i++)
        if (f->nr[i] == n->data.nr) { kind = f->kind[i]; break; }
    if (!kind || !proc_layout(kind, n->data.args, &addr, &nofollow, &creat) || addr == 0) return 0;
    char path[4096];
    size_t chunk = 4096 - (size_t)(addr % 4096);
    /* Most names are short: copy 256 bytes first, the rest of the page only when no NUL came (a page-sized
       copy costs ~0.4 us more, on each of the hundreds of stats a Python start-up makes). */
    size_t first = chunk < 256 ? chunk : 256;
    struct iovec l = { path, first }, r = { (void *)(uintptr_t)addr, first };
    ssize_t got = process_vm_readv((pid_t)n->pid, &l, 1, &r, 1, 0);
    if (got <= 0) return 0;
    if (memchr(path, 0, (size_t)got) == NULL) {
        if ((size_t)got != first || first == chunk) return 0;
        struct iovec l2 = { path + first, chunk - first }, r2 = { (void *)(uintptr_t)(addr + first), chunk - first };
        ssize_t more = process_vm_readv((pid_t)n->pid, &l2, 1, &r2, 1, 0);
        if (more <= 0 || memchr(path + first, 0, (size_t)more) == NULL) return 0;
    }
    if (path[0] == 0) {  /* fstat through AT_EMPTY_PATH (or ENOENT from the kernel): names nothing */
        sl_notif_continue(listener, n->id);
        f->served++;
        return 1;
    }
    if (path[0] != '/') return 0;
    struct sl_open_how how = { O_PATH | O_CLOEXEC | (nofollow ? O_NOFOLLOW : 0), 0,
                               RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV };
    long fd = syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
    if (fd >= 0) {
        close((int)fd);
        sl_notif_continue(listener, n->id);
    } else if (errno == ENOENT && !creat && !proc_kernel_name(path)) {
        sl_notif_send(listener, n->id, 0, -ENOENT, 0);
    } else {
        return 0;
    }
    f->served++;
    return 1;
}

/* getdents64 of a directory other than /proc's root (isolate_pids filters only that one): done on a duplicate of
 * the child's fd (same open file description, so the same offset) and the entries written to its buffer. The
 * pidfd is checked against the pending notification before it is used. 1 if answered, 0 for Python. */
static int proc_getdents(struct sl_proc_fast *f, int listener, const struct seccomp_notif *n)
{
    if (n->data.nr != f->nr_getdents64 || n->data.arch != f->arch) return 0;
    uint64_t id = n->id, addr = n->data.args[1];
    uint32_t count = (uint32_t)n->data.args[2];
    long pidfd = syscall(SYS_pidfd_open, (pid_t)n->pid, O_EXCL /* PIDFD_THREAD */);
    if (pidfd < 0) pidfd = syscall(SYS_pidfd_open, (pid_t)n->pid, 0);
    if (pidfd < 0) return 0;
    int answered = 0;
    if (ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) == 0) {
        long dup = syscall(SYS_pidfd_getfd, (int)pidfd, (int)n->data.args[0], 0);
        struct stat st;
        if (dup >= 0 && fstat((int)dup, &st) == 0 && S_ISDIR(st.st_mode)
                && !((uint64_t)st.st_dev == f->proc_dev && (uint64_t)st.st_ino == f->proc_ino)) {
            long r = syscall(SYS_getdents64, (int)dup, f->buf, count < SL_PROC_BUF ? count : SL_PROC_BUF);
            if (r > 0) {
                struct iovec l = { f->buf, (size_t)r }, rv = { (void *)(uintptr_t)addr, (size_t)r };
                if (process_vm_writev((pid_t)n->pid, &l, 1, &rv, 1, 0) != r) r = -EFAULT;
                sl_notif_send(listener, n->id, r > 0 ? r : 0, r > 0 ? 0 : (int32_t)r, 0);
            } else {
                sl_notif_send(listener, n->id, 0, r < 0 ? -errno : 0, 0);
            }
            answered = 1;
            f->served++;
        }
        if (dup >= 0) close((int)dup);
    }
    close((int)pidfd);
    return answered;
}

long sl_proc_wait_recv(struct sl_proc_fast *f, int listener, int wake_fd, int timeout_ms, struct seccomp_notif *n)
{
    for (;;) {
        long r = sl_notif_wait_recv(listener, wake_fd, timeout_ms, n);
        if (r != 1) return r;
        if (proc_try(f, listener, n) || proc_getdents(f, listener, n)) {
            continue;
        }
        return r;
    }
}

/* ==== seccomp COW (cow.py, cow_fast.py): the read path answered in C ===========================================
 *
 * Under the seccomp COW every path syscall is notified (a filter cannot read a path), and most of them are reads
 * of files the sandbox never wrote, for which the kernel's own answer already is the merged one. This loop answers
 * those CONTINUE without waking Python:
 *  - while the branch is clean (nothing copied up, created or whited out): every read-only call, decided on the
 *    registers alone (the open flags; no memory read);
 *  - afterwards, a read-only call whose name, made absolute against the caller's cwd or dirfd and normalised
 *    lexically ('..' goes to Python), is outside the workdir, or is inside it and (a) no directory on the way is
 *    an upper entry other than a plain copy of the lower directory, a whiteout or an opaque directory (WALK),
 *    (b) the entry itself has no upper copy (LEAF), (c) the lower walk meets no symlink (openat2 with
 *    RESOLVE_NO_SYMLINKS on the workdir; a missing or non-directory component is fine: the upper has nothing
 *    there either, by (a)): then the kernel walks the lower exactly as cow_view.resolve would and finds the same
 *    entry, or the same ENOENT/ENOTDIR;
 *  - getdents64 of a directory whose listing is unchanged (no LIST/LEAF/WALK), fchdir to a directory outside the
 *    upper, getcwd (no virtual cwd exists while f->on).
 * Anything else (writes, '..', /proc and /dev/fd names, a cwd or dirfd in the upper, a symlink in the walk, long
 * names, unreadable memory, a hash that matches) goes to the Python handlers, which resolve in the merged view.
 *
 * Why a CONTINUE decided on a name read from the child is no confinement hole: only read-only calls are continued
 * (open flags are registers, not memory) and Landlock still checks the real access in the kernel. A thread that
 * rewrites the name after our read gets the kernel's answer for its new name, at worst the lower (pre-run) view
 * of a file its own sandbox changed; the lower is readable to it anyway. Writes, creates and renames never pass
 * here. The table holds 64-bit hashes of workdir-relative names (Python fills it from the branch, before the
 * next receive); a collision only sends a call to Python. A stale notification is harmless: CONTINUE then fails.
 */
#include <stdio.h>  /* snprintf: the supervisor side, never after fork */
#ifndef RESOLVE_NO_SYMLINKS
#define RESOLVE_NO_SYMLINKS 0x04
#endif
#define SL_COW_EMPTY 0
#define SL_COW_TOMB 1
#define SL_FNV_OFFSET 1469598103934665603ULL
#define SL_FNV_PRIME 1099511628211ULL
#define SL_O_TMPFILE_BIT 020000000

static uint64_t cow_key(uint64_t h) { return h < 2 ? h + 2 : h; }  /* 0 and 1 mark empty and deleted slots */
static uint64_t cow_step(uint64_t h, unsigned char c) { return (h ^ c) * SL_FNV_PRIME; }

uint64_t sl_cow_hash(const char *s, size_t len)
{
    uint64_t h = SL_FNV_OFFSET;
    for (size_t i = 0; i < len; i++) h = cow_step(h, (unsigned char)s[i]);
    return cow_key(h);
}

static uint32_t cow_slot(const struct sl_cow_fast *f, uint64_t key) { return (uint32_t)(key ^ (key >> 29)) & f->mask; }

/* Set (flags != 0) or remove (flags == 0) a key; -ENOSPC when the table is half full (Python makes a bigger one). */
long sl_cow_put(struct sl_cow_fast *f, uint64_t key, uint32_t flags)
{
    if (key < 2 || f->table == NULL) return -EINVAL;
    uint32_t h = cow_slot(f, key), spare = UINT32_MAX;
    for (uint32_t i = 0; i <= f->mask; i++, h = (h + 1) & f->mask) {
        uint64_t k = f->table[h].key;
        if (k == key) {
            f->table[h].key = flags ? key : SL_COW_TOMB;
            f->table[h].flags = flags;
            return 0;
        }
        if (k == SL_COW_TOMB && spare == UINT32_MAX) spare = h;
        if (k == SL_COW_EMPTY) break;
    }
    if (!flags) return 0;
    if (spare == UINT32_MAX) {
        if (f->used >= (f->mask + 1) / 2) return -ENOSPC;
        for (h = cow_slot(f, key); f->table[h].key != SL_COW_EMPTY; h = (h + 1) & f->mask) {}
        f->used++;
        spare = h;
    }
    f->table[spare].key = key;
    f->table[spare].flags = flags;
    return 0;
}

static uint32_t cow_flags(const struct sl_cow_fast *f, uint64_t key)
{
    uint32_t h = cow_slot(f, key);
    for (uint32_t i = 0; i <= f->mask; i++, h = (h + 1) & f->mask) {
        uint64_t k = f->table[h].key;
        if (k == key) return f->table[h].flags;
        if (k == SL_COW_EMPTY) return 0;
    }
    return SL_COW_WALK;  /* a full table of tombstones: not known, so not untouched */
}

/* Do the workdir-relative name `rel` and the directories on its way carry none of the marks? leaf_mask: more marks
 * that matter for the entry itself (LIST for a listing). */
static int cow_rel_untouched(const struct sl_cow_fast *f, const char *rel, size_t len, uint32_t leaf_mask)
{
    if (f->used == 0) return 1;
    uint64_t h = SL_FNV_OFFSET;
    for (size_t i = 0; i < len; i++) {
        if (rel[i] == '/' && (cow_flags(f, cow_key(h)) & SL_COW_WALK)) return 0;
        h = cow_step(h, (unsigned char)rel[i]);
    }
    return !(cow_flags(f, cow_key(h)) & (SL_COW_WALK | SL_COW_LEAF | leaf_mask));
}

static int cow_under(const char *s, size_t len, const char *top, size_t tlen)
{
    return len >= tlen && memcmp(s, top, tlen) == 0 && (len == tlen || s[tlen] == '/');
}

/* The NUL-terminated string at addr in the child (page by page); its length, or -1. */
static long cow_read_str(pid_t pid, uint64_t addr, char *out, size_t cap)
{
    size_t got = 0;
    while (got < cap) {
        size_t chunk = 4096 - (size_t)((addr + got) % 4096);
        if (chunk > cap - got) chunk = cap - got;
        struct iovec l = { out + got, chunk }, r = { (void *)(uintptr_t)(addr + got), chunk };
        ssize_t n = process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (n <= 0) return -1;
        char *z = memchr(out + got, 0, (size_t)n);
        if (z) return z - out;
        got += (size_t)n;
    }
    return -1;
}

/* readlink of /proc/<pid>/cwd (fd < 0) or /proc/<pid>/fd/<fd> into out (NUL-terminated); its length, or -1. */
static long cow_proc_link(pid_t pid, int fd, char *out)
{
    char link[64];
    if (fd < 0) snprintf(link, sizeof link, "/proc/%d/cwd", (int)pid);
    else snprintf(link, sizeof link, "/proc/%d/fd/%d", (int)pid, fd);
    ssize_t r = readlink(link, out, SL_COW_PATH - 1);
    if (r <= 0 || r >= SL_COW_PATH - 1) return -1;
    out[r] = 0;
    return r;
}

/* Append the components of p to the absolute name out[0..*len) ("" is /): empty and "." skipped; -1 for ".."
 * (a symlink before it would change what it means) or a name too long. */
static int cow_append(char *out, size_t *len, const char *p)
{
    while (*p) {
        while (*p == '/') p++;
        if (!*p) break;
        const char *e = strchrnul(p, '/');
        size_t cl = (size_t)(e - p);
        if (cl == 2 && p[0] == '.' && p[1] == '.') return -1;
        if (!(cl == 1 && p[0] == '.')) {
            if (*len + 1 + cl >= SL_COW_PATH) return -1;
            out[(*len)++] = '/';
            memcpy(out + *len, p, cl);
            *len += cl;
        }
        p = e;
    }
    out[*len] = 0;
    return 0;
}

/* Is the kernel's answer for the normalised absolute name the merged one? */
static int cow_name_ok(const struct sl_cow_fast *f, const char *abs, size_t alen, int nofollow)
{
    if ((alen >= 5 && memcmp(abs, "/proc", 5) == 0) || (alen >= 7 && memcmp(abs, "/dev/fd", 7) == 0)) return 0;
    if (!cow_under(abs, alen, f->workdir, f->wd_len)) return 1;  /* lexically outside: cow.py's read rule */
    if (alen == f->wd_len) return 1;                            /* the workdir itself is never copied up */
    const char *rel = abs + f->wd_len + 1;
    if (!cow_rel_untouched(f, rel, alen - f->wd_len - 1, 0)) return 0;
    struct sl_open_how how = { O_PATH | O_CLOEXEC | (nofollow ? O_NOFOLLOW : 0), 0, RESOLVE_NO_SYMLINKS };
    long fd = syscall(SYS_openat2, f->wd_fd, rel, &how, sizeof how);
    if (fd >= 0) {
        close((int)fd);
        return 1;
    }
    return errno == ENOENT || errno == ENOTDIR;
}

/* A path syscall's fields: dirfd, path address, whether the last link is not followed, whether it may write,
 * whether an empty name is the kernel's to answer (fstat through AT_EMPTY_PATH, or its ENOENT). */
struct cow_call { int dirfd; uint64_t addr; int nofollow, writes, empty_ok; };

static int cow_open_writes(uint32_t fl)
{
    return (fl & O_ACCMODE) != O_RDONLY || (fl & (O_CREAT | O_TRUNC | SL_O_TMPFILE_BIT)) != 0;
}

static int cow_layout(int kind, const __u64 *a, struct cow_call *c)
{
    memset(c, 0, sizeof *c);
    c->dirfd = AT_FDCWD;
    c->empty_ok = 1;
    switch (kind) {
    case SL_CK_STAT: case SL_CK_ACCESS: c->addr = a[0]; return 1;
    case SL_CK_LSTAT: case SL_CK_READLINK: c->addr = a[0]; c->nofollow = 1; return 1;
    case SL_CK_FSTATAT: case SL_CK_FACCESSAT2:
        c->dirfd = (int)a[0]; c->addr = a[1]; c->nofollow = ((uint32_t)a[3] & AT_SYMLINK_NOFOLLOW) != 0; return 1;
    case SL_CK_STATX:
        c->dirfd = (int)a[0]; c->addr = a[1]; c->nofollow = ((uint32_t)a[2] & AT_SYMLINK_NOFOLLOW) != 0; return 1;
    case SL_CK_FACCESSAT: c->dirfd = (int)a[0]; c->addr = a[1]; return 1;
    case SL_CK_READLINKAT: c->dirfd = (int)a[0]; c->addr = a[1]; c->nofollow = 1; return 1;
    case SL_CK_OPEN:
        c->addr = a[0]; c->nofollow = ((uint32_t)a[1] & O_NOFOLLOW) != 0;
        c->writes = cow_open_writes((uint32_t)a[1]); c->empty_ok = 0; return 1;
    case SL_CK_OPENAT:
        c->dirfd = (int)a[0]; c->addr = a[1]; c->nofollow = ((uint32_t)a[2] & O_NOFOLLOW) != 0;
        c->writes = cow_open_writes((uint32_t)a[2]); c->empty_ok = 0; return 1;
    case SL_CK_CHDIR: c->addr = a[0]; c->empty_ok = 0; return 1;
    }
    return 0;
}

static int cow_path_ok(const struct sl_cow_fast *f, const struct seccomp_notif *n, int kind)
{
    struct cow_call c;
    if (!cow_layout(kind, n->data.args, &c) || c.writes) return 0;
    if (f->clean) return 1;  /* nothing written yet: every name's merged entry is its lower one */
    if (c.addr == 0) return 0;
    char path[SL_COW_PATH], abs[SL_COW_PATH];
    long len = cow_read_str((pid_t)n->pid, c.addr, path, sizeof path);
    if (len < 0) return 0;
    if (len == 0) return c.empty_ok;
    /* "link/" and "link/." follow the link: after normalisation "link" is last, so follow it here */
    if (path[len - 1] == '/' || (path[len - 1] == '.' && (len == 1 || path[len - 2] == '/'))) c.nofollow = 0;
    size_t alen = 0;
    if (path[0] != '/') {
        if (c.dirfd < 0 && c.dirfd != AT_FDCWD) return 0;
        long b = cow_proc_link((pid_t)n->pid, c.dirfd == AT_FDCWD ? -1 : c.dirfd, abs);
        /* a base in the upper (or a removed directory) is the merged view's to resolve */
        if (b < 0 || abs[0] != '/' || cow_under(abs, (size_t)b, f->upper, f->up_len)
                || (b > 10 && memcmp(abs + b - 10, " (deleted)", 10) == 0)) return 0;
        alen = b == 1 ? 0 : (size_t)b;
    }
    if (cow_append(abs, &alen, path) < 0) return 0;
    return cow_name_ok(f, abs, alen, c.nofollow);
}

/* fchdir (listing = 0) or getdents64 (1) of the fd in args[0]. */
static int cow_fd_ok(const struct sl_cow_fast *f, const struct seccomp_notif *n, int listing)
{
    char name[SL_COW_PATH];
    int fd = (int)n->data.args[0];
    if (fd < 0) return 0;
    long r = cow_proc_link((pid_t)n->pid, fd, name);
    if (r < 0) return 0;
    if (name[0] != '/') return 1;  /* a pipe, socket or anonymous inode: no directory of the workdir */
    if (cow_under(name, (size_t)r, f->upper, f->up_len)) return 0;
    if (!listing || !cow_under(name, (size_t)r, f->workdir, f->wd_len)) return 1;
    size_t wl = f->wd_len;
    return (size_t)r == wl ? cow_rel_untouched(f, "", 0, SL_COW_LIST)
                           : cow_rel_untouched(f, name + wl + 1, (size_t)r - wl - 1, SL_COW_LIST);
}

/* 1 if answered here (CONTINUE), 0 if the Python handlers decide. */
static int cow_try(struct sl_cow_fast *f, int listener, const struct seccomp_notif *n)
{
    int kind = 0, ok;
    if (!f->on || n->data.arch != f->arch) return 0;
    for (int i = 0; i < f->n; i++)
        if (f->nr[i] == n->data.nr) { kind = f->kind[i]; break; }
    switch (kind) {
    case 0: return 0;
    case SL_CK_GETCWD: ok = 1; break;            /* no virtual cwd while f->on */
    case SL_CK_IF_CLEAN: ok = f->clean; break;   /* execve, xattr reads: Python's once something was written */
    case SL_CK_FCHDIR: ok = cow_fd_ok(f, n, 0); break;
    case SL_CK_GETDENTS: ok = f->clean || cow_fd_ok(f, n, 1); break;
    default: ok = cow_path_ok(f, n, kind);
    }
    if (!ok) return 0;
    sl_notif_continue(listener, n->id);
    f->served++;
    return 1;
}

long sl_cow_wait_recv(struct sl_cow_fast *f, int listener, int wake_fd, int timeout_ms, struct seccomp_notif *n)
{
    for (;;) {
        long r = sl_notif_wait_recv(listener, wake_fd, timeout_ms, n);
        if (r != 1 || !cow_try(f, listener, n)) return r;
    }
}
