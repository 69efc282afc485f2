/*
 * rdtsc -- the time-stamp counter instructions.
 *
 * Exercises: `rdtsc` and `rdtscp` (sensitive instructions the virtualizer
 * traps or patches), executed 100000 times each in a tight loop.  Each
 * instruction's readings must never go backwards, and the counter must
 * advance over the run.  Only yes/no verdicts are printed (never the counter
 * values, nor the TSC_AUX/cpu number that rdtscp returns in ECX).  An
 * `lfence` precedes each rdtsc so it is not executed ahead of the previous
 * reading.
 * Expected: "rdtsc monotonic: yes\nrdtscp monotonic: yes\n"
 *           "rdtsc advanced: yes\n", exit 0.
 */
#include <stdio.h>
#include <stdint.h>

#define ITERS 100000

static inline uint64_t read_tsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile ("lfence\n\trdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return ((uint64_t)hi << 32) | lo;
}

static inline uint64_t read_tscp(void)
{
    uint32_t lo, hi, aux;
    __asm__ volatile ("rdtscp" : "=a"(lo), "=d"(hi), "=c"(aux) :: "memory");
    (void)aux;
    return ((uint64_t)hi << 32) | lo;
}

int main(void)
{
    int tsc_ok = 1, tscp_ok = 1;
    uint64_t first = read_tsc();
    uint64_t prev_tsc = first, prev_tscp = read_tscp();
    uint64_t last = first;

    for (int i = 0; i < ITERS; i++) {
        uint64_t t = read_tsc();
        uint64_t tp = read_tscp();
        if (t < prev_tsc)
            tsc_ok = 0;
        if (tp < prev_tscp)
            tscp_ok = 0;
        prev_tsc = t;
        prev_tscp = tp;
        last = t;
    }

    printf("rdtsc monotonic: %s\n", tsc_ok ? "yes" : "no");
    printf("rdtscp monotonic: %s\n", tscp_ok ? "yes" : "no");
    printf("rdtsc advanced: %s\n", last > first ? "yes" : "no");
    return 0;
}
