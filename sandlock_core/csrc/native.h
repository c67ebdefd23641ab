/* Declarations shared by native.c and the cffi cdef in _ffi_build.py (keep the two in step). */
#ifndef SANDLOCK_NATIVE_H
#define SANDLOCK_NATIVE_H
#include <stddef.h>
#include <stdint.h>
#include <linux/seccomp.h>

struct sl_ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};

enum {
    SL_STEP_SETPGID = 1, SL_STEP_PDEATHSIG, SL_STEP_PARENT_GONE, SL_STEP_SIGNALS, SL_STEP_STDIO,
    SL_STEP_PERSONALITY, SL_STEP_AFFINITY, SL_STEP_THP, SL_STEP_CORE, SL_STEP_CHDIR, SL_STEP_NNP,
    SL_STEP_LANDLOCK, SL_STEP_SECCOMP, SL_STEP_HANDOFF, SL_STEP_READY, SL_STEP_CLOSE_FDS, SL_STEP_NOFILE,
    SL_STEP_EXEC, SL_STEP_FILTER2, SL_STEP_SPAWN,
    /* namespaces (namespaces.py): keep these last */
    SL_STEP_NS_USERNS = 40, SL_STEP_NS_IDMAP, SL_STEP_NS_PRIVATE, SL_STEP_NS_OVERLAY, SL_STEP_NS_CLONE,
    SL_STEP_NS_READONLY, SL_STEP_NS_REATTACH, SL_STEP_NS_CHROOT, SL_STEP_NS_CWD, SL_STEP_NS_DUMPABLE,
    SL_STEP_NS_LANDLOCK, SL_STEP_NS_PIDNS, SL_STEP_NS_PROC, SL_STEP_NS_HOSTPID,
};

struct sl_cfg {
    /* process */
    int new_pgrp;
    int pdeathsig;
    int parent_pid;
    int reset_signals;
    int stdio[3];              /* -1: inherit */
    unsigned long personality_flags;  /* 0: leave alone */
    const unsigned char *cpu_mask;
    int cpu_mask_len;
    int thp_disable;
    int no_coredump;
    const char *cwd;
    long nofile;               /* -1: leave alone */
    int close_fds;
    const int *keep_fds;       /* sorted ascending */
    int n_keep_fds;
    int quiet_errors;
    /* confinement */
    int landlock_fd;           /* -1: none */
    unsigned int landlock_flags;
    const void *filter;
    unsigned short filter_len;
    unsigned int seccomp_flags;
    const void *filter2;
    unsigned short filter2_len;
    /* hand-off */
    int sock_fd;               /* -1: no supervisor */
    int handoff_scm;           /* 1: SCM_RIGHTS, 0: send the fd number for pidfd_getfd */
    int report_fd;             /* reaper -> caller: 'P' root pid, then 'X' wait status or 'K' killed */
    /* exec */
    char *const *exec_paths;
    int n_exec_paths;
    char *const *argv;
    char *const *envp;
    /* namespaces (namespaces.py, cow_overlay.py); fields added at the end, keep _ffi_build.py in step */
    int ns_enable;             /* 1: unshare(CLONE_NEWUSER|CLONE_NEWNS) and map the caller's uid/gid */
    int ns_privileged;         /* 1: the caller is uid/gid 0 inside, else itself */
    const char *ov_target;     /* overlay mounted on this path (the workdir, also its lowerdir); NULL: none */
    const char *ov_options;    /* "lowerdir=...,upperdir=...,workdir=...,userxattr" */
    int ns_readonly;           /* 1: every mount read-only except ov_target and ns_writable[] */
    char *const *ns_writable;
    int n_ns_writable;
    const char *ns_chroot;     /* NULL: none */
    uint64_t ov_landlock_rights;  /* added to landlock_fd for the mounted overlay's root (0: none) */
    int ns_pid;                /* 1: isolate_pids by a user + mount + pid namespace (sl_spawn only) */
    char *const *ns_proc_paths;   /* Landlock rules of the policy under /proc, added again on the new /proc */
    const uint64_t *ns_proc_rights;
    int n_ns_proc;
};


long sl_landlock_create_ruleset(const struct sl_ruleset_attr *attr, size_t size, uint32_t flags);
long sl_landlock_add_path_rule(int ruleset_fd, uint64_t allowed, int parent_fd);
long sl_landlock_add_net_rule(int ruleset_fd, uint64_t allowed, uint64_t port);
long sl_landlock_restrict_self(int ruleset_fd, uint32_t flags);
long sl_seccomp(unsigned int op, unsigned int flags, void *args);
long sl_seccomp_set_filter(const void *insns, unsigned short count, unsigned int flags);
long sl_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);
long sl_pidfd_open(int pid, unsigned int flags);
long sl_pidfd_getfd(int pidfd, int fd, unsigned int flags);
long sl_pidfd_send_signal(int pidfd, int sig);
long sl_close_range(unsigned int first, unsigned int last, unsigned int flags);
long sl_process_vm_readv(int pid, void *local, size_t len, uint64_t remote);
long sl_process_vm_writev(int pid, const void *local, size_t len, uint64_t remote);
long sl_socketpair(int sv[2]);
long sl_raw_syscall6(long nr, long a, long b, long c, long d, long e, long f);
long sl_notif_sizes(uint16_t out[3]);
long sl_notif_wait_recv(int listener, int wake_fd, int timeout_ms, struct seccomp_notif *n);
long sl_notif_send(int listener, uint64_t id, int64_t val, int32_t error, uint32_t flags);
long sl_notif_continue(int listener, uint64_t id);
long sl_notif_id_valid(int listener, uint64_t id);
long sl_notif_addfd(int listener, uint64_t id, int srcfd, int newfd, uint32_t newfd_flags, uint32_t flags);
long sl_notif_set_flags(int listener, uint64_t flags);
long sl_send_fd(int sock, int fd);
long sl_recv_msg_fd(int sock, void *buf, size_t cap, int *fd_out);
const char *sl_step_name(int step);
int sl_confine(const struct sl_cfg *cfg);
long sl_spawn(const struct sl_cfg *cfg);
long sl_fork_with_reaper(const struct sl_cfg *cfg);
long sl_pidns_probe(void);
long sl_wait_pidfd(int pidfd, int pid, int timeout_ms, int *status);
long sl_fork_clones(int first, int n, int sock, int nworkers, int batch, int *pids, int *statuses);
void sl_clone_exit(int code);
long sl_fork_env_slot(void);
struct sl_out { char *data; size_t len; size_t cap; int fd; };
#define SL_FORK_CTL 0x40000000
#define SL_FORK_IDLE 0x20000000
long sl_fork_watch_ctl(int epfd, int fd);
long sl_fork_watch(int epfd, const int *fds, int nfds, int first, int stride, struct sl_out *outs, int n);
long sl_fork_drain(int epfd, int timeout_ms, struct sl_out *outs, int n);
void sl_fork_outputs_free(struct sl_out *outs, int n);

/* ---- deterministic execution (deterministic.py): getrandom answered in C; keep _ffi_build.py in step ---- */
#define SL_DET_SLOTS 256          /* processes whose next stream bytes are kept here */
#define SL_DET_BUF 4096           /* bytes per slot: one stream block */
#define SL_DET_MAP 4096           /* thread id -> slot, open addressing; a power of two */
#define SL_DET_TOMB 0xFFFFFFFFu   /* a deleted map entry */
#define SL_DET_GRND_FLAGS 7       /* GRND_NONBLOCK | GRND_RANDOM | GRND_INSECURE */
struct sl_det_slot { uint32_t len, pos; unsigned char buf[SL_DET_BUF]; };
struct sl_det_entry { uint32_t tid; int32_t slot; };
struct sl_det_fast {
    int nr;                        /* getrandom's number and the native audit arch */
    uint32_t arch;
    uint64_t served;               /* getrandom calls answered here */
    uint32_t used;                 /* map entries in use, tombstones included */
    struct sl_det_entry map[SL_DET_MAP];
    struct sl_det_slot slots[SL_DET_SLOTS];
};
long sl_det_map_put(struct sl_det_fast *f, uint32_t tid, int32_t slot);
long sl_det_map_del(struct sl_det_fast *f, uint32_t tid);
void sl_det_map_clear(struct sl_det_fast *f);
long sl_det_answer(int listener, const struct seccomp_notif *n, const void *data, size_t count);
long sl_det_wait_recv(struct sl_det_fast *f, int listener, int wake_fd, int timeout_ms, struct seccomp_notif *n);

/* ---- procfs (procfs.py): stat/access/open of absolute names that stay on the root file system, answered in C
 * (continue, or ENOENT when absent); everything else goes to the Python handlers. Keep _ffi_build.py in step ---- */
#define SL_PROC_NRS 16
enum { SL_PK_STAT = 1, SL_PK_LSTAT, SL_PK_ACCESS, SL_PK_FSTATAT, SL_PK_STATX, SL_PK_FACCESSAT, SL_PK_FACCESSAT2,
       SL_PK_OPEN, SL_PK_OPENAT };
#define SL_PROC_BUF 65536
struct sl_proc_fast { int nr[SL_PROC_NRS]; int kind[SL_PROC_NRS]; int n; uint32_t arch; uint64_t served;
                      int nr_getdents64; uint64_t proc_dev, proc_ino; unsigned char buf[SL_PROC_BUF]; };
long sl_proc_wait_recv(struct sl_proc_fast *f, int listener, int wake_fd, int timeout_ms, struct seccomp_notif *n);

/* ---- seccomp COW (cow_fast.py): read-only calls of paths the upper layer cannot affect answered CONTINUE in C;
 * everything else goes to the Python handlers. Keep _ffi_build.py in step ---- */
#define SL_COW_NRS 32
enum { SL_CK_STAT = 1, SL_CK_LSTAT, SL_CK_FSTATAT, SL_CK_STATX, SL_CK_ACCESS, SL_CK_FACCESSAT, SL_CK_FACCESSAT2,
       SL_CK_READLINK, SL_CK_READLINKAT, SL_CK_OPEN, SL_CK_OPENAT, SL_CK_CHDIR, SL_CK_FCHDIR, SL_CK_GETDENTS,
       SL_CK_GETCWD, SL_CK_IF_CLEAN };
#define SL_COW_WALK 1   /* the kernel's walk must not pass through this name (upper entry, whiteout, opaque dir) */
#define SL_COW_LEAF 2   /* the merged entry itself differs from the lower one (it has an upper copy) */
#define SL_COW_LIST 4   /* the merged listing of this directory differs */
#define SL_COW_PATH 4096
struct sl_cow_ent { uint64_t key; uint32_t flags; uint32_t pad; };
struct sl_cow_fast {
    int nr[SL_COW_NRS]; int kind[SL_COW_NRS]; int n; uint32_t arch;
    int on;                    /* 0: every notification to Python (a virtual cwd exists) */
    int clean;                 /* 1: nothing was written yet: every read-only call is the kernel's */
    uint64_t served;           /* notifications answered here */
    int wd_fd;                 /* O_PATH on the workdir (the lower) */
    uint32_t wd_len, up_len;
    char workdir[SL_COW_PATH]; /* realpath of the workdir, no trailing slash */
    char upper[SL_COW_PATH];   /* the branch's upper directory */
    struct sl_cow_ent *table;  /* open addressing on a path hash (sl_cow_hash of the workdir-relative name) */
    uint32_t mask, used;
};
uint64_t sl_cow_hash(const char *s, size_t len);
long sl_cow_put(struct sl_cow_fast *f, uint64_t key, uint32_t flags);
long sl_cow_wait_recv(struct sl_cow_fast *f, int listener, int wake_fd, int timeout_ms, struct seccomp_notif *n);

#endif
