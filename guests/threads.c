/*
 * threads -- sensitive instructions executed concurrently by several threads.
 *
 * Exercises: a multi-threaded guest in which every thread keeps hitting the
 * instructions the virtualizer traps or patches: a raw inline-asm `syscall`
 * (getpid), `cpuid` (leaf 0), `rdtsc`, and indirect calls through a
 * function-pointer table.  A ptrace-based virtualizer must follow every
 * thread (clone events), keep per-thread state apart and handle traps from
 * several threads at once.  Each thread checks that getpid equals the main
 * thread's pid, that the cpuid vendor string equals the main thread's, and
 * that its own rdtsc readings never go backwards; it folds its iteration
 * results into a checksum that depends only on the thread index and the
 * iteration count.  The main thread joins the threads and prints their
 * results in thread order (never pids, tids or counter values).
 *
 * Usage: threads [iterations]   (default 20000)
 * Expected: one "thread <i>: ..." line per thread, then "threads: ok",
 *           exit 0 (exit 1 and "threads: FAIL" if any check fails).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NTHREADS     4
#define DEFAULT_ITER 20000

struct result {
    int index;
    long iters;
    uint32_t checksum;
    int pid_ok, cpuid_ok, tsc_ok;
};

static long g_iters = DEFAULT_ITER;
static long g_pid;
static char g_vendor[12];

static long raw_getpid(void)
{
    long ret;
    __asm__ volatile ("syscall"
                      : "=a"(ret)
                      : "0"(39L)                 /* __NR_getpid */
                      : "rcx", "r11", "memory");
    return ret;
}

static void cpuid_vendor(char out[12])
{
    uint32_t a, b, c, d;
    __asm__ volatile ("cpuid"
                      : "=a"(a), "=b"(b), "=c"(c), "=d"(d)
                      : "0"(0u), "2"(0u));
    (void)a;
    memcpy(out + 0, &b, 4);
    memcpy(out + 4, &d, 4);
    memcpy(out + 8, &c, 4);
}

static inline uint64_t read_tsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile ("lfence\n\trdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return ((uint64_t)hi << 32) | lo;
}

__attribute__((noinline)) static uint32_t op_mul(uint32_t h, uint32_t v)
{ return (h ^ v) * 0x01000193u; }
__attribute__((noinline)) static uint32_t op_rot(uint32_t h, uint32_t v)
{ return ((h << 7) | (h >> 25)) + v; }
__attribute__((noinline)) static uint32_t op_add(uint32_t h, uint32_t v)
{ return h + v * 0x9e3779b9u; }
__attribute__((noinline)) static uint32_t op_xsh(uint32_t h, uint32_t v)
{ return (h ^ (h >> 13)) ^ (v << 3); }

/* Read through a volatile so the calls stay indirect (`call *reg`). */
static uint32_t (*volatile const ops[4])(uint32_t, uint32_t) = {
    op_mul, op_rot, op_add, op_xsh
};

static void *worker(void *arg)
{
    struct result *r = arg;
    uint32_t h = 0x811c9dc5u ^ (uint32_t)r->index;
    uint64_t prev = read_tsc();
    char vendor[12];

    r->pid_ok = r->cpuid_ok = r->tsc_ok = 1;
    for (long i = 0; i < g_iters; i++) {
        if (raw_getpid() != g_pid)
            r->pid_ok = 0;
        cpuid_vendor(vendor);
        if (memcmp(vendor, g_vendor, sizeof vendor) != 0)
            r->cpuid_ok = 0;
        uint64_t t = read_tsc();
        if (t < prev)
            r->tsc_ok = 0;
        prev = t;
        h = ops[(i + r->index) & 3](h, (uint32_t)i);
    }
    r->iters = g_iters;
    r->checksum = h;
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t tid[NTHREADS];
    struct result res[NTHREADS];
    int all_ok = 1;

    if (argc > 1) {
        g_iters = strtol(argv[1], NULL, 0);
        if (g_iters < 0)
            g_iters = 0;
    }
    g_pid = raw_getpid();
    cpuid_vendor(g_vendor);

    for (int i = 0; i < NTHREADS; i++) {
        memset(&res[i], 0, sizeof res[i]);
        res[i].index = i;
        if (pthread_create(&tid[i], NULL, worker, &res[i]) != 0) {
            printf("pthread_create failed\n");
            return 2;
        }
    }
    for (int i = 0; i < NTHREADS; i++)
        pthread_join(tid[i], NULL);

    for (int i = 0; i < NTHREADS; i++) {
        const struct result *r = &res[i];
        printf("thread %d: iterations=%ld checksum=0x%08x getpid=%s "
               "cpuid=%s rdtsc-monotonic=%s\n",
               r->index, r->iters, r->checksum,
               r->pid_ok ? "ok" : "BAD", r->cpuid_ok ? "ok" : "BAD",
               r->tsc_ok ? "yes" : "no");
        if (!r->pid_ok || !r->cpuid_ok || !r->tsc_ok)
            all_ok = 0;
    }
    printf("threads: %s\n", all_ok ? "ok" : "FAIL");
    return all_ok ? 0 : 1;
}
