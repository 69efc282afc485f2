/* stubs KIND N: N runs of a loop around one site of KIND, for the bench's table of
 * what each stub kind costs (bench/run.py times N and 0 runs and divides the
 * difference by N, so start-up drops out).  KIND: syscall (getppid by a `syscall`
 * instruction), rdtsc, rdtscp, cpuid (leaf 0), call (`call *reg`), jmp (`jmp *reg`,
 * a computed goto).  Prints the kind, N and a checksum that does not depend on the
 * runner: how many results agreed with the first (syscall, cpuid), how many
 * counter reads did not go backwards (rdtsc, rdtscp), a sum (call, jmp). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long raw_getppid(void)
{
    long ret;
    __asm__ volatile ("syscall" : "=a"(ret) : "0"(110L) : "rcx", "r11", "memory");
    return ret;
}

static uint32_t vendor_word(void)
{
    uint32_t a, b, c, d;
    __asm__ volatile ("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "0"(0u), "2"(0u));
    return b ^ c ^ d;
}

__attribute__((noinline)) static long bump(long v) { return v + 3; }

static long (*volatile target)(long) = bump;

static long jumps(long n)
{
    static void *const labels[] = { &&a, &&b, &&c, &&d };
    long sum = 0, i = 0;
    if (n <= 0)
        return 0;
    goto *labels[0];
a:  sum += 1; if (++i == n) return sum; goto *labels[i & 3];
b:  sum += 2; if (++i == n) return sum; goto *labels[i & 3];
c:  sum += 3; if (++i == n) return sum; goto *labels[i & 3];
d:  sum += 4; if (++i == n) return sum; goto *labels[i & 3];
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: stubs syscall|rdtsc|rdtscp|cpuid|call|jmp N\n");
        return 2;
    }
    const char *kind = argv[1];
    long n = atol(argv[2]), check = 0;
    if (!strcmp(kind, "syscall")) {
        long first = raw_getppid();
        for (long i = 0; i < n; i++)
            check += raw_getppid() == first;
    } else if (!strcmp(kind, "rdtsc") || !strcmp(kind, "rdtscp")) {
        int p = kind[5] == 'p';
        uint64_t last = 0;
        for (long i = 0; i < n; i++) {
            uint32_t lo, hi, aux;
            if (p)
                __asm__ volatile ("rdtscp" : "=a"(lo), "=d"(hi), "=c"(aux));
            else
                __asm__ volatile ("rdtsc" : "=a"(lo), "=d"(hi));
            uint64_t now = (uint64_t)hi << 32 | lo;
            check += now >= last;
            last = now;
        }
    } else if (!strcmp(kind, "cpuid")) {
        uint32_t first = vendor_word();
        for (long i = 0; i < n; i++)
            check += vendor_word() == first;
    } else if (!strcmp(kind, "call")) {
        for (long i = 0; i < n; i++)
            check = target(check);
    } else if (!strcmp(kind, "jmp")) {
        check = jumps(n);
    } else {
        fprintf(stderr, "stubs: unknown kind %s\n", kind);
        return 2;
    }
    printf("stubs %s %ld %ld\n", kind, n, check);
    return 0;
}
