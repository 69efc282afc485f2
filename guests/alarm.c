/*
 * alarm -- asynchronous timer signals landing in busy code.
 *
 * Exercises: SIGALRM from setitimer(ITIMER_REAL, 10 ms interval) arriving
 * at arbitrary points of a busy loop that keeps executing `cpuid` and
 * `rdtsc`, so some ticks land while the virtualizer is in the middle of
 * trapping/emulating one of those instructions (or while the guest is in a
 * patched trampoline).  The handler must run, and the interrupted code must
 * resume with its registers intact.  The loop repeats a fixed computation
 * ("pass") and checks every pass gives the same result, that the cpuid
 * vendor never changes and that rdtsc never goes backwards.  The printed
 * checksum is the result of one pass, so it does not depend on how many
 * passes ran before 20 ticks were counted.  A 60 s wall-clock limit
 * (CLOCK_MONOTONIC) stops the program if the ticks never come.
 * Expected: "alarm: 20 ticks", "passes consistent: yes",
 *           "cpuid stable: yes", "rdtsc monotonic: yes",
 *           "checksum: 0x<hex>", exit 0.
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#define TARGET_TICKS 20
#define PASS_STEPS   2000
#define LIMIT_SEC    60

static volatile sig_atomic_t ticks;

static void on_alarm(int sig)
{
    (void)sig;
    ticks++;
}

static void cpuid0(uint32_t r[4])
{
    __asm__ volatile ("cpuid"
                      : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
                      : "0"(0u), "2"(0u));
}

static inline uint64_t read_tsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile ("lfence\n\trdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return ((uint64_t)hi << 32) | lo;
}

/* One pass: a fixed integer computation with sensitive instructions mixed
 * in.  Its result depends only on the arithmetic, never on cpuid/rdtsc
 * values, which are only checked. */
__attribute__((noinline))
static uint32_t one_pass(const uint32_t vendor[4], int *cpuid_ok,
                         uint64_t *prev_tsc, int *tsc_ok)
{
    uint32_t h = 0x811c9dc5u;
    for (uint32_t i = 0; i < PASS_STEPS; i++) {
        h = (h ^ i) * 0x01000193u;
        h += (h >> 11) ^ (i * 0x9e3779b9u);
        if ((i & 63) == 0) {
            uint32_t r[4];
            cpuid0(r);
            if (memcmp(r, vendor, sizeof r) != 0)
                *cpuid_ok = 0;
        }
        if ((i & 15) == 0) {
            uint64_t t = read_tsc();
            if (t < *prev_tsc)
                *tsc_ok = 0;
            *prev_tsc = t;
        }
    }
    return h;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(void)
{
    struct sigaction sa;
    struct itimerval it;
    uint32_t vendor[4];
    int cpuid_ok = 1, tsc_ok = 1, consistent = 1;
    uint64_t prev_tsc;
    uint32_t first = 0;
    unsigned long passes = 0;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGALRM, &sa, NULL) != 0)
        return 2;

    cpuid0(vendor);
    prev_tsc = read_tsc();
    double start = now();

    memset(&it, 0, sizeof it);
    it.it_interval.tv_usec = 10000;
    it.it_value.tv_usec = 10000;
    if (setitimer(ITIMER_REAL, &it, NULL) != 0)
        return 2;

    while (ticks < TARGET_TICKS) {
        uint32_t h = one_pass(vendor, &cpuid_ok, &prev_tsc, &tsc_ok);
        if (passes++ == 0)
            first = h;
        else if (h != first)
            consistent = 0;
        if ((passes & 255) == 0 && now() - start > LIMIT_SEC)
            break;
    }

    memset(&it, 0, sizeof it);
    setitimer(ITIMER_REAL, &it, NULL);

    if (ticks < TARGET_TICKS) {
        printf("alarm: timed out\n");
        return 1;
    }
    printf("alarm: %d ticks\n", TARGET_TICKS);
    printf("passes consistent: %s\n", consistent ? "yes" : "no");
    printf("cpuid stable: %s\n", cpuid_ok ? "yes" : "no");
    printf("rdtsc monotonic: %s\n", tsc_ok ? "yes" : "no");
    printf("checksum: 0x%08x\n", first);
    return consistent && cpuid_ok && tsc_ok ? 0 : 1;
}
