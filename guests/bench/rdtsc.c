/* rdtsc: 2000000 x rdtsc via inline asm.  Prints the count and whether the counter
 * advanced overall (not per-step monotonicity, which a migration may break). */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 2000000;
    uint64_t first = rdtsc(), last = first, sink = 0;
    for (long i = 0; i < n; i++) {
        last = rdtsc();
        sink ^= last;
    }
    printf("rdtsc %ld advanced=%s\n", n, last > first ? "yes" : "no");
    return sink == 1;   /* keep the loop; never true in practice */
}
