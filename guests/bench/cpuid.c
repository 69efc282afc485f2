/* cpuid: 200000 x cpuid leaf 0 via inline asm.  The values depend on the runner's CPU
 * model (qemu reports its own), so print only how many answers agreed with the first. */
#include <stdio.h>
#include <stdlib.h>

static inline void cpuid0(unsigned r[4])
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(0), "c"(0));
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 200000;
    unsigned first[4], r[4];
    cpuid0(first);
    long same = 0;
    for (long i = 0; i < n; i++) {
        cpuid0(r);
        same += r[0] == first[0] && r[1] == first[1] && r[2] == first[2] && r[3] == first[3];
    }
    printf("cpuid %ld same=%ld\n", n, same);
    return 0;
}
