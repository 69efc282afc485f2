/*
 * threadphases -- four threads keep running sensitive instructions while the
 * main thread waits on stdin between phases.
 *
 * Exercises: the live mode switch in a multi-threaded guest.  The test sends
 * SIGUSR1 to sbe while the main thread waits for a line and the four workers
 * run on: every site is re-planted in the other mode with all five threads
 * stopped, none of them inside a window being rewritten.  Each worker loops
 * over a raw getpid syscall, cpuid leaf 0, rdtsc and indirect calls until the
 * main thread says stop; it checks each result, and its checksum depends only
 * on the calls' inputs (never on how many iterations ran).
 *
 * Usage: threadphases   (reads two lines from stdin)
 * Expected: "phase 1", "phase 2", "phase 3", one "thread <i>: ..." line per
 * thread, "threadphases: ok", exit 0.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define NTHREADS 4

static volatile int g_stop;
static char g_vendor[12];
static long g_pid;

struct result { int pid_ok, cpuid_ok, tsc_ok, call_ok; };

static long raw_getpid(void)
{
    long ret;
    __asm__ volatile ("syscall" : "=a"(ret) : "0"(39L) : "rcx", "r11", "memory");
    return ret;
}

static void vendor(char out[12])
{
    uint32_t a, b, c, d;
    __asm__ volatile ("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "0"(0u), "2"(0u));
    (void)a;
    memcpy(out, &b, 4);
    memcpy(out + 4, &d, 4);
    memcpy(out + 8, &c, 4);
}

static inline uint64_t tsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile ("rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return ((uint64_t)hi << 32) | lo;
}

__attribute__((noinline)) static uint32_t twice(uint32_t v) { return v * 2; }
__attribute__((noinline)) static uint32_t plus3(uint32_t v) { return v + 3; }
static uint32_t (*volatile const ops[2])(uint32_t) = { twice, plus3 };

static void *worker(void *arg)
{
    struct result *r = arg;
    uint64_t last = 0;
    char v[12];
    r->pid_ok = r->cpuid_ok = r->tsc_ok = r->call_ok = 1;
    for (uint32_t i = 0; !g_stop; i++) {
        r->pid_ok &= raw_getpid() == g_pid;
        vendor(v);
        r->cpuid_ok &= memcmp(v, g_vendor, 12) == 0;
        uint64_t now = tsc();
        r->tsc_ok &= now >= last;
        last = now;
        uint32_t x = i & 0xffff;
        r->call_ok &= ops[i & 1](x) == ((i & 1) ? x + 3 : x * 2);
    }
    return NULL;
}

static void phase(int n)
{
    char line[64];
    printf("phase %d\n", n);
    fflush(stdout);
    if (n < 3 && !fgets(line, sizeof line, stdin))
        return;
}

int main(void)
{
    pthread_t t[NTHREADS];
    struct result res[NTHREADS];
    int ok = 1;

    g_pid = getpid();
    vendor(g_vendor);
    for (int i = 0; i < NTHREADS; i++)
        pthread_create(&t[i], NULL, worker, &res[i]);
    phase(1);
    phase(2);
    phase(3);
    g_stop = 1;
    for (int i = 0; i < NTHREADS; i++) {
        pthread_join(t[i], NULL);
        printf("thread %d: getpid=%s cpuid=%s rdtsc-monotonic=%s calls=%s\n", i,
               res[i].pid_ok ? "ok" : "BAD", res[i].cpuid_ok ? "ok" : "BAD",
               res[i].tsc_ok ? "yes" : "NO", res[i].call_ok ? "ok" : "BAD");
        ok &= res[i].pid_ok && res[i].cpuid_ok && res[i].tsc_ok && res[i].call_ok;
    }
    puts(ok ? "threadphases: ok" : "threadphases: FAIL");
    return ok ? 0 : 1;
}
