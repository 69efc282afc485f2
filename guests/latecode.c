/*
 * latecode -- threads that reach new code in a page that already runs.
 *
 * Exercises: sites found after their page ran, in a process with several
 * threads.  The page .text.late starts with `late_entry`, which every thread
 * calls first (the page's first fetch, scanned from there); 128 bytes on,
 * behind zero padding that ends a linear sweep, lies `late_work`, which the
 * threads reach only through a pointer made at run time.  So its syscall,
 * cpuid and rdtsc are found by an extension scan while five threads share
 * the address space.  Patching them needs every thread stopped (a window is
 * more than one byte); a tracer that cannot stop them leaves them as traps,
 * and each call of `late_work` then costs three trips to the monitor.
 *
 * Each thread checks that the raw getpid equals the process's pid, that the
 * cpuid vendor string is the main thread's, and that its rdtsc readings never
 * go backwards; the main thread prints the results in thread order.
 *
 * Usage: latecode [iterations]   (default 20000)
 * Expected: one "thread <i>: ..." line per thread, then "latecode: ok", exit 0.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NTHREADS 4

/* late_work(out): out[0] = getpid(), out[1..3] = cpuid(0) ebx, edx, ecx,
 * out[4] = rdtsc. Each site has five movable bytes before it, so each can be
 * given a window. */
__asm__(
    ".pushsection .text.late,\"ax\",@progbits\n"
    ".balign 4096\n"
    ".globl late_entry\n"
    "late_entry:\n"
    "    xorl %eax, %eax\n"
    "    ret\n"
    "    .zero 64\n"
    ".org late_entry + 128\n"
    "late_work:\n"
    "    pushq %rbx\n"
    "    movq %rdi, %r8\n"
    "    movl $39, %eax\n"
    "    syscall\n"
    "    movq %rax, 0(%r8)\n"
    "    movl $0, %eax\n"
    "    movl $0, %ecx\n"
    "    cpuid\n"
    "    movq %rbx, 8(%r8)\n"
    "    movq %rdx, 16(%r8)\n"
    "    movq %rcx, 24(%r8)\n"
    "    movq %r8, %r9\n"
    "    movl $0, %ecx\n"
    "    rdtsc\n"
    "    shlq $32, %rdx\n"
    "    orq %rdx, %rax\n"
    "    movq %rax, 32(%r9)\n"
    "    popq %rbx\n"
    "    ret\n"
    ".popsection\n");

extern long late_entry(void);
typedef void work_fn(uint64_t out[5]);

static volatile long g_offset = 128;   /* not a constant the scanner could follow */
static long g_iters = 20000;
static pthread_barrier_t g_start;
static char g_vendor[12];

struct result { int pid_ok, cpuid_ok, tsc_ok; };

static void vendor_of(const uint64_t out[5], char v[12])
{
    uint32_t b = (uint32_t)out[1], d = (uint32_t)out[2], c = (uint32_t)out[3];
    memcpy(v, &b, 4);
    memcpy(v + 4, &d, 4);
    memcpy(v + 8, &c, 4);
}

static void *worker(void *arg)
{
    struct result *r = arg;
    uint64_t out[5], last = 0;
    char v[12];
    pthread_barrier_wait(&g_start);
    late_entry();
    work_fn *work = (work_fn *)((char *)late_entry + g_offset);
    r->pid_ok = r->cpuid_ok = r->tsc_ok = 1;
    for (long i = 0; i < g_iters; i++) {
        work(out);
        vendor_of(out, v);
        r->pid_ok &= (long)out[0] == (long)getpid();
        r->cpuid_ok &= memcmp(v, g_vendor, 12) == 0;
        r->tsc_ok &= out[4] >= last;
        last = out[4];
    }
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t t[NTHREADS];
    struct result res[NTHREADS];
    uint32_t a, b, c, d;
    int ok = 1;

    if (argc > 1)
        g_iters = atol(argv[1]);
    __asm__ volatile ("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "0"(0u), "2"(0u));
    (void)a;
    memcpy(g_vendor, &b, 4);
    memcpy(g_vendor + 4, &d, 4);
    memcpy(g_vendor + 8, &c, 4);
    pthread_barrier_init(&g_start, NULL, NTHREADS);
    for (int i = 0; i < NTHREADS; i++)
        pthread_create(&t[i], NULL, worker, &res[i]);
    for (int i = 0; i < NTHREADS; i++) {
        pthread_join(t[i], NULL);
        printf("thread %d: iterations=%ld getpid=%s cpuid=%s rdtsc-monotonic=%s\n", i, g_iters,
               res[i].pid_ok ? "ok" : "BAD", res[i].cpuid_ok ? "ok" : "BAD",
               res[i].tsc_ok ? "yes" : "NO");
        ok &= res[i].pid_ok && res[i].cpuid_ok && res[i].tsc_ok;
    }
    puts(ok ? "latecode: ok" : "latecode: FAIL");
    return ok ? 0 : 1;
}
