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
    SL_STEP_EXEC, SL_STEP_FILTER2,
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
    /* exec */
    char *const *exec_paths;
    int n_exec_paths;
    char *const *argv;
    char *const *envp;
};

#endif
