"""cffi builder for ``sandlock_core._native`` (out-of-line API mode, compiled at install time).

API mode because ABI mode parses these declarations at every import (about 100 ms measured here), which a
CLI cannot afford; the compiled module imports in about a millisecond. Struct layouts come from the system
headers at compile time, so they are right for whatever architecture builds the module.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")

CDEF = """
struct seccomp_data { int nr; uint32_t arch; uint64_t instruction_pointer; uint64_t args[6]; };
struct seccomp_notif { uint64_t id; uint32_t pid; uint32_t flags; struct seccomp_data data; };
struct sl_ruleset_attr { uint64_t handled_access_fs; uint64_t handled_access_net; uint64_t scoped; };

struct sl_cfg {
    int new_pgrp; int pdeathsig; int parent_pid; int reset_signals; int stdio[3];
    unsigned long personality_flags; const unsigned char *cpu_mask; int cpu_mask_len;
    int thp_disable; int no_coredump; const char *cwd; long nofile; int close_fds;
    const int *keep_fds; int n_keep_fds; int quiet_errors;
    int landlock_fd; unsigned int landlock_flags;
    const void *filter; unsigned short filter_len; unsigned int seccomp_flags;
    const void *filter2; unsigned short filter2_len;
    int sock_fd; int handoff_scm; int report_fd;
    char *const *exec_paths; int n_exec_paths; char *const *argv; char *const *envp;
    /* namespaces (native.h) */
    int ns_enable; int ns_privileged; const char *ov_target; const char *ov_options;
    int ns_readonly; char *const *ns_writable; int n_ns_writable; const char *ns_chroot;
    uint64_t ov_landlock_rights; int ns_pid;
    char *const *ns_proc_paths; const uint64_t *ns_proc_rights; int n_ns_proc;
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
/* deterministic execution (native.h): getrandom answered in C */
#define SL_DET_SLOTS 256
#define SL_DET_BUF 4096
#define SL_DET_MAP 4096
struct sl_det_slot { uint32_t len, pos; unsigned char buf[SL_DET_BUF]; };
struct sl_det_entry { uint32_t tid; int32_t slot; };
struct sl_det_fast { int nr; uint32_t arch; uint64_t served; uint32_t used;
                     struct sl_det_entry map[SL_DET_MAP]; struct sl_det_slot slots[SL_DET_SLOTS]; };
long sl_det_map_put(struct sl_det_fast *f, uint32_t tid, int32_t slot);
long sl_det_map_del(struct sl_det_fast *f, uint32_t tid);
void sl_det_map_clear(struct sl_det_fast *f);
long sl_det_answer(int listener, const struct seccomp_notif *n, const void *data, size_t count);
long sl_det_wait_recv(struct sl_det_fast *f, int listener, int wake_fd, int timeout_ms, struct seccomp_notif *n);
/* procfs (native.h): stat/access/open of root-file-system names answered in C */
#define SL_PROC_NRS 16
#define SL_PK_STAT 1
#define SL_PK_LSTAT 2
#define SL_PK_ACCESS 3
#define SL_PK_FSTATAT 4
#define SL_PK_STATX 5
#define SL_PK_FACCESSAT 6
#define SL_PK_FACCESSAT2 7
#define SL_PK_OPEN 8
#define SL_PK_OPENAT 9
#define SL_PROC_BUF 65536
struct sl_proc_fast { int nr[SL_PROC_NRS]; int kind[SL_PROC_NRS]; int n; uint32_t arch; uint64_t served;
                      int nr_getdents64; uint64_t proc_dev, proc_ino; unsigned char buf[SL_PROC_BUF]; };
long sl_proc_wait_recv(struct sl_proc_fast *f, int listener, int wake_fd, int timeout_ms, struct seccomp_notif *n);
/* seccomp COW (native.h): read-only calls of untouched paths answered CONTINUE in C */
#define SL_COW_NRS 32
#define SL_COW_PATH 4096
struct sl_cow_ent { uint64_t key; uint32_t flags; uint32_t pad; };
struct sl_cow_fast { int nr[SL_COW_NRS]; int kind[SL_COW_NRS]; int n; uint32_t arch; int on; int clean;
                     uint64_t served; int wd_fd; uint32_t wd_len, up_len; char workdir[SL_COW_PATH];
                     char upper[SL_COW_PATH]; struct sl_cow_ent *table; uint32_t mask, used; };
uint64_t sl_cow_hash(const char *s, size_t len);
long sl_cow_put(struct sl_cow_fast *f, uint64_t key, uint32_t flags);
long sl_cow_wait_recv(struct sl_cow_fast *f, int listener, int wake_fd, int timeout_ms, struct seccomp_notif *n);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "sandlock_core._native",
    '#include "native.h"',
    sources=[os.path.relpath(os.path.join(CSRC, "native.c"))],
    include_dirs=[os.path.relpath(CSRC)],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(HERE), verbose=False)
