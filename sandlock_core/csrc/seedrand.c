/*
 * seedrand: libc's getrandom() and getentropy() answered inside the process, for sandboxes with random_seed.
 *
 * The sandbox preloads this library (LD_PRELOAD) into every dynamically linked program. Without it each
 * os.urandom() is a getrandom(2) that the supervisor answers (a round trip, ~10 us). With it a thread draws
 * one 32-byte key from the supervisor (a raw getrandom(2): that thread's process stream, deterministic) and
 * then makes its bytes itself with ChaCha20, so the result still depends only on the seed and the order in
 * which processes were spawned and threads made their first call. deterministic.py documents the stream.
 *
 * Fail closed: whenever something here cannot do its job (no key, a signal handler interrupting a call,
 * a NULL buffer), the call becomes the raw syscall, which the supervisor answers from the seeded stream.
 * It never falls back to anything non-deterministic. Depends on libc only (it is loaded anyway).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#endif
#define SR_GRND_NONBLOCK 0x1
#define SR_GRND_RANDOM 0x2
#define SR_GRND_INSECURE 0x4
#define SR_MAX_RW 0x7ffff000UL /* the kernel's MAX_RW_COUNT: longer reads return this many bytes */
#define SR_BLOCK 64

/* ------------------------------------------------------------------ ChaCha20 (RFC 8439, section 2.3) */
static inline uint32_t rotl32(uint32_t v, int n) { return (v << n) | (v >> (32 - n)); }

#define QUARTER(a, b, c, d)                                  \
    do {                                                     \
        a += b; d ^= a; d = rotl32(d, 16);                   \
        c += d; b ^= c; b = rotl32(b, 12);                   \
        a += b; d ^= a; d = rotl32(d, 8);                    \
        c += d; b ^= c; b = rotl32(b, 7);                    \
    } while (0)

static void store32le(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}

static uint32_t load32le(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* One 64-byte keystream block: the state is the constants, the key (8 words), the block counter and a
 * 96-bit nonce (3 words); 20 rounds (10 column + diagonal double rounds); the input is added back. */
EXPORT void sl_seedrand_chacha20_block(const uint32_t key[8], uint32_t counter, const uint32_t nonce[3],
                                       uint8_t out[SR_BLOCK])
{
    uint32_t in[16] = {0x61707865, 0x3320646e, 0x79622d32, 0x6b206574};  /* "expand 32-byte k" */
    memcpy(in + 4, key, 32);
    in[12] = counter;
    memcpy(in + 13, nonce, 12);
    uint32_t x[16];
    memcpy(x, in, sizeof x);
    for (int i = 0; i < 10; i++) {
        QUARTER(x[0], x[4], x[8], x[12]);
        QUARTER(x[1], x[5], x[9], x[13]);
        QUARTER(x[2], x[6], x[10], x[14]);
        QUARTER(x[3], x[7], x[11], x[15]);
        QUARTER(x[0], x[5], x[10], x[15]);
        QUARTER(x[1], x[6], x[11], x[12]);
        QUARTER(x[2], x[7], x[8], x[13]);
        QUARTER(x[3], x[4], x[9], x[14]);
    }
    for (int i = 0; i < 16; i++)
        store32le(out + 4 * i, x[i] + in[i]);
}

/* ------------------------------------------------------------------ per-thread generator */
/* A thread's bytes are blocks 0, 1, 2, ... of ChaCha20 under its key, block i with counter = low 32 bits
 * of i and nonce = (high 32 bits of i, 0, 0): one 64-bit block counter, so the stream never repeats. */
struct sr_thread {
    uint32_t key[8];
    uint64_t block;          /* the next block to make */
    uint8_t buf[SR_BLOCK];   /* the current block; bytes before pos are used */
    uint32_t pos;            /* SR_BLOCK: buf is used up */
    uint64_t gen;            /* the fork generation the key belongs to; 0: no key yet */
    pid_t pid;               /* getpid() when keyed (fork check when there is no generation page) */
    int busy;                /* inside a call: a signal handler's getrandom takes the raw syscall */
};

/* initial-exec: a preloaded library's TLS sits in the static block, so no __tls_get_addr call per access */
static __thread struct sr_thread sr_t __attribute__((tls_model("initial-exec")));

/* Fork detection without a syscall per call: a MADV_WIPEONFORK page holds the generation, which a forked
 * child reads as 0, so its keys (all from the parent's generation) are stale and it draws new ones from its
 * own stream: parent and child never share bytes. sr_last keeps the generation in ordinary memory (copied
 * by fork), so the child's new generation differs from every key it inherited. Without the page (kernel
 * before 4.14, madvise refused by a syscall policy) each call compares getpid() instead. */
static uint64_t *sr_gen_page;
static uint64_t sr_last = 1;

__attribute__((constructor)) static void sr_init(void)
{
    void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return;
    if (madvise(p, 4096, MADV_WIPEONFORK) != 0) {
        munmap(p, 4096);
        return;
    }
    *(uint64_t *)p = sr_last;
    sr_gen_page = p;
}

/* The current generation; after a fork the first caller in the child starts a new one. */
static uint64_t sr_generation(void)
{
    uint64_t g = __atomic_load_n(sr_gen_page, __ATOMIC_ACQUIRE);
    if (g != 0)
        return g;
    uint64_t want = __atomic_load_n(&sr_last, __ATOMIC_RELAXED) + 1, zero = 0;
    if (__atomic_compare_exchange_n(sr_gen_page, &zero, want, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        __atomic_store_n(&sr_last, want, __ATOMIC_RELAXED);
        return want;
    }
    return zero;  /* another thread of the child started it first */
}

static int sr_key_is_current(struct sr_thread *t)
{
    if (t->gen == 0)
        return 0;
    if (sr_gen_page != NULL)
        return t->gen == sr_generation();
    return t->pid == getpid();
}

/* Draw the thread's key with the raw syscall: the supervisor serves it from the process's seeded stream. */
static int sr_rekey(struct sr_thread *t)
{
    uint8_t k[32];
    size_t got = 0;
    int saved = errno;
    while (got < sizeof k) {
        long r = syscall(SYS_getrandom, k + got, sizeof k - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;  /* errno is the kernel's; the caller falls back to the raw syscall */
        got += (size_t)r;
    }
    errno = saved;
    for (int i = 0; i < 8; i++)
        t->key[i] = load32le(k + 4 * i);
    t->block = 0;
    t->pos = SR_BLOCK;
    t->gen = sr_gen_page != NULL ? sr_generation() : 1;
    t->pid = getpid();
    return 0;
}

static void sr_make_block(struct sr_thread *t, uint8_t out[SR_BLOCK])
{
    uint32_t nonce[3] = {(uint32_t)(t->block >> 32), 0, 0};
    sl_seedrand_chacha20_block(t->key, (uint32_t)t->block, nonce, out);
    t->block++;
}

/* The next len bytes of the thread's stream: the rest of the current block, whole blocks straight into
 * the caller's buffer, then the head of a new block (its tail stays for the next call). */
static void sr_fill(struct sr_thread *t, uint8_t *out, size_t len)
{
    while (len > 0) {
        if (t->pos == SR_BLOCK && len >= SR_BLOCK) {
            sr_make_block(t, out);
            out += SR_BLOCK;
            len -= SR_BLOCK;
            continue;
        }
        if (t->pos == SR_BLOCK) {
            sr_make_block(t, t->buf);
            t->pos = 0;
        }
        size_t n = SR_BLOCK - t->pos < len ? SR_BLOCK - t->pos : len;
        memcpy(out, t->buf + t->pos, n);
        t->pos += (uint32_t)n;
        out += n;
        len -= n;
    }
}

static ssize_t sr_raw(void *buf, size_t len, unsigned int flags)
{
    return syscall(SYS_getrandom, buf, len, flags);
}

/* Flags only choose the kernel's pool and blocking, which a seeded stream has neither of: every valid
 * combination gives the same bytes. Invalid ones fail like the kernel's (EINVAL). A buffer that is not
 * writable faults here (SIGSEGV), as with the vDSO getrandom of newer kernels; only NULL is sent to the
 * kernel, which answers EFAULT. */
static ssize_t sr_getrandom(void *buf, size_t len, unsigned int flags)
{
    const unsigned int both = SR_GRND_RANDOM | SR_GRND_INSECURE;
    if ((flags & ~(SR_GRND_NONBLOCK | both)) != 0 || (flags & both) == both) {
        errno = EINVAL;
        return -1;
    }
    if (len == 0)
        return 0;
    struct sr_thread *t = &sr_t;
    if (buf == NULL || t->busy)
        return sr_raw(buf, len, flags);
    t->busy = 1;
    if (!sr_key_is_current(t) && sr_rekey(t) != 0) {
        t->busy = 0;
        return sr_raw(buf, len, flags);
    }
    if (len > SR_MAX_RW)
        len = SR_MAX_RW;
    sr_fill(t, buf, len);
    t->busy = 0;
    return (ssize_t)len;
}

EXPORT ssize_t getrandom(void *buf, size_t len, unsigned int flags)
{
    return sr_getrandom(buf, len, flags);
}

/* glibc's contract: at most 256 bytes (else EIO), all of them or -1. */
EXPORT int getentropy(void *buf, size_t len)
{
    if (len > 256) {
        errno = EIO;
        return -1;
    }
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t r = sr_getrandom(p, len, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += r;
        len -= (size_t)r;
    }
    return 0;
}
