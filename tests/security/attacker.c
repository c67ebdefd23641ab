/* Raw attacks run inside the sandbox. Each prints "<what> <return> <errno>" and exits 0, unless the kernel
 * kills it (SIGSYS) first. Arguments are decimal or 0x hex. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/io_uring.h>
#include <linux/perf_event.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *what, long r) {
    printf("%s %ld %d\n", what, r, r < 0 ? errno : 0);
    fflush(stdout);
}

static unsigned long num(const char *s) { return strtoul(s, NULL, 0); }

int main(int argc, char **argv) {
    const char *cmd = argc > 1 ? argv[1] : "";
    long r;
    if (!strcmp(cmd, "ptrace")) {                       /* PTRACE_ATTACH pid */
        pid_t pid = num(argv[2]);
        r = syscall(SYS_ptrace, PTRACE_ATTACH, pid, 0, 0);
        report("ptrace", r);
        if (r == 0) syscall(SYS_ptrace, PTRACE_DETACH, pid, 0, 0);
        r = syscall(SYS_ptrace, PTRACE_SEIZE, pid, 0, 0);
        report("seize", r);
        if (r == 0) syscall(SYS_ptrace, PTRACE_DETACH, pid, 0, 0);
    } else if (!strcmp(cmd, "vmwrite")) {               /* process_vm_writev pid addr */
        char buf[] = "PWNED!!!";
        struct iovec local = {buf, 8}, remote = {(void *)num(argv[3]), 8};
        r = syscall(SYS_process_vm_writev, (pid_t)num(argv[2]), &local, 1, &remote, 1, 0);
        report("vmwrite", r);
        r = syscall(SYS_process_vm_readv, (pid_t)num(argv[2]), &local, 1, &remote, 1, 0);
        report("vmread", r);
    } else if (!strcmp(cmd, "mem")) {                   /* write /proc/pid/mem at addr */
        char path[64];
        snprintf(path, sizeof path, "/proc/%s/mem", argv[2]);
        int fd = open(path, O_RDWR);
        report("mem-open", fd);
        if (fd >= 0) report("mem-write", pwrite(fd, "PWNED!!!", 8, (off_t)num(argv[3])));
    } else if (!strcmp(cmd, "kill")) {                  /* kill pid sig, then pidfd_send_signal */
        pid_t pid = num(argv[2]);
        int sig = num(argv[3]);
        report("kill", kill(pid, sig));
        int pfd = syscall(SYS_pidfd_open, pid, 0);
        report("pidfd_open", pfd);
        if (pfd >= 0) report("pidfd_send_signal", syscall(SYS_pidfd_send_signal, pfd, sig, NULL, 0));
    } else if (!strcmp(cmd, "io_uring")) {
        struct io_uring_params p;
        memset(&p, 0, sizeof p);
        report("io_uring_setup", syscall(SYS_io_uring_setup, 8, &p));
    } else if (!strcmp(cmd, "userfaultfd")) {
        report("userfaultfd", syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    } else if (!strcmp(cmd, "bpf")) {
        union bpf_attr a;
        memset(&a, 0, sizeof a);
        a.map_type = BPF_MAP_TYPE_ARRAY; a.key_size = 4; a.value_size = 4; a.max_entries = 1;
        report("bpf", syscall(SYS_bpf, BPF_MAP_CREATE, &a, sizeof a));
    } else if (!strcmp(cmd, "perf")) {
        struct perf_event_attr a;
        memset(&a, 0, sizeof a);
        a.type = PERF_TYPE_SOFTWARE; a.size = sizeof a; a.config = PERF_COUNT_SW_CPU_CLOCK;
        a.exclude_kernel = 1; a.exclude_hv = 1;
        report("perf_event_open", syscall(SYS_perf_event_open, &a, 0, -1, -1, 0));
    } else if (!strcmp(cmd, "clone")) {                 /* raw clone(flags|SIGCHLD) */
        r = syscall(SYS_clone, num(argv[2]) | SIGCHLD, 0, 0, 0, 0);
        if (r == 0) _exit(0);
        report("clone", r);
        if (r > 0) waitpid(r, NULL, 0);
    } else if (!strcmp(cmd, "clone3")) {
        struct clone_args ca;
        memset(&ca, 0, sizeof ca);
        ca.flags = num(argv[2]); ca.exit_signal = SIGCHLD;
        r = syscall(SYS_clone3, &ca, sizeof ca);
        if (r == 0) _exit(0);
        report("clone3", r);
        if (r > 0) waitpid(r, NULL, 0);
    } else if (!strcmp(cmd, "shmexec")) {               /* execve of a path in MAP_SHARED memory a forked
                                                         * process (own mm) flips: shmexec ALLOWED DENIED N */
        const char *ok = argv[2], *bad = argv[3];
        int n = num(argv[4]), ran_ok = 0, refused = 0, other = 0;
        close(0);  /* no process of ours has an fd 0 left to compare */
        char *buf = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        strcpy(buf, ok);
        pid_t flipper = fork();
        if (flipper == 0) {
            for (;;) { strcpy(buf, bad); strcpy(buf, ok); }
        }
        for (int i = 0; i < n; i++) {
            pid_t c = fork();
            if (c == 0) {
                char *av[] = {"probe", NULL}, *ev[] = {NULL};
                execve(buf, av, ev);
                _exit(errno == EPERM || errno == EACCES ? 99 : 98);
            }
            int st;
            waitpid(c, &st, 0);
            if (WIFEXITED(st) && WEXITSTATUS(st) == 0) ran_ok++;
            else if (WIFEXITED(st) && WEXITSTATUS(st) == 99) refused++;
            else other++;
        }
        kill(flipper, SIGKILL);
        waitpid(flipper, NULL, 0);
        printf("shmexec %d %d %d\n", ran_ok, refused, other);
    } else if (!strcmp(cmd, "x32")) {                   /* a syscall number with __X32_SYSCALL_BIT */
        report("x32", syscall(num(argv[2]) | 0x40000000UL, -1L, -1L, -1L, -1L, -1L));  /* args harmless */
    } else if (!strcmp(cmd, "int80")) {                 /* the i386 entry from a 64-bit process */
        /* all-ones arguments: harmless even if the call went through (EINVAL/EFAULT, never e.g. an empty
         * hostname) */
        __asm__ volatile ("int $0x80" : "=a"(r) : "a"(num(argv[2])), "b"(-1), "c"(-1), "d"(-1), "S"(-1), "D"(-1)
                          : "memory");
        printf("int80 %ld\n", r);
    } else {
        fprintf(stderr, "unknown attack %s\n", cmd);
        return 2;
    }
    return 0;
}
